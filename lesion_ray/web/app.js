// The page: upload an image to v1/segment?format=json and draw the mask over it (no build step).
"use strict";

const MAX_WIDTH = 800;
const $ = (id) => document.getElementById(id);
let last = null; // {image, mask} of the latest answer, redrawn when the opacity changes

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return response.statusText;
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = src;
  });
}

function draw() {
  const { image, mask } = last;
  const canvas = $("view");
  const scale = Math.min(1, MAX_WIDTH / image.naturalWidth);
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const picture = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const layer = document.createElement("canvas");
  layer.width = canvas.width;
  layer.height = canvas.height;
  const lctx = layer.getContext("2d");
  lctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
  const maskPixels = lctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const alpha = Number($("opacity").value);
  const p = picture.data;
  for (let i = 0; i < p.length; i += 4) {
    if (maskPixels[i] > 127) { // the mask is 0/255 greyscale; > 127 is lesion
      p[i] = p[i] * (1 - alpha) + 230 * alpha;
      p[i + 1] = p[i + 1] * (1 - alpha) + 25 * alpha;
      p[i + 2] = p[i + 2] * (1 - alpha) + 75 * alpha;
    }
  }
  ctx.putImageData(picture, 0, 0);
  canvas.dataset.state = "overlay";
}

function showAttributes(attributes) {
  const body = $("attributes").querySelector("tbody");
  body.replaceChildren(...Object.entries(attributes).map(([name, p]) => {
    const row = document.createElement("tr");
    for (const text of [name, (100 * p).toFixed(1) + " %"]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    return row;
  }));
  $("attributes").hidden = false;
}

async function segment(file) {
  setStatus("Segmenting " + file.name + "...");
  $("view").dataset.state = "busy";
  const response = await fetch("v1/segment?format=json", {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", ...headers() },
    body: file,
  });
  if (!response.ok) {
    $("view").dataset.state = "error";
    setStatus("Error " + response.status + ": " + (await errorText(response)), true);
    return;
  }
  const answer = await response.json();
  const url = URL.createObjectURL(file);
  try {
    last = { image: await loadImage(url), mask: await loadImage("data:image/png;base64," + answer.mask) };
  } finally {
    URL.revokeObjectURL(url);
  }
  draw();
  showAttributes(answer.attributes);
  setStatus(file.name + ": " + answer.width + "x" + answer.height + ", lesion area " +
    (100 * answer.lesion_area_fraction).toFixed(1) + " %, model " + answer.model.name + "@" + answer.model.version);
}

async function showModel() {
  const response = await fetch("v1/model", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = response.status === 401 ? "model: enter the token" : "model: unavailable";
    return;
  }
  const info = await response.json();
  $("model").textContent = "model " + info.name + "@" + info.version + " (task " + info.task + ", " +
    info.input_size + "px)";
}

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) segment(file).catch((err) => setStatus("Error: " + err.message, true));
});
$("token").addEventListener("change", () => {
  sessionStorage.setItem("lesion-ray-token", $("token").value);
  showModel();
});
$("opacity").addEventListener("input", () => last && draw());
$("token").value = sessionStorage.getItem("lesion-ray-token") || "";
showModel();
