"""``kind: synth``: a synthetic dermoscopy data set in exactly the ISIC 2018 layout.

Each image is drawn from its own random stream, seeded by ``(seed, index)``, so a data set is the
same whatever the cluster, batching or order, and images are generated in parallel as Ray Data
tasks that write straight to the output URI (local or S3) through :mod:`lesion_ray.storage`.

An image is built in layers, as a dermoscope sees skin: a skin-tone background with texture and
uneven light; one lesion, a star-shaped blob with an irregular border, soft edge and colour
variation (its Task 1 mask: one contiguous region without holes); dermoscopic structures inside
the lesion, each with its frequency in the ISIC 2018 training set and its own shape
(pigment / negative network: a net of dark / light lines; streaks: radial lines at the border;
milia-like cysts: small bright dots; globules: dark round dots), which are the Task 2 masks;
hairs across everything; optionally the dark corners of the dermoscope's round field of view.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import ray
from PIL import Image, ImageDraw, ImageFilter
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lesion_ray import preprocess, report, storage
from lesion_ray.data import ATTRIBUTES, FOLDERS
from lesion_ray.settings import Settings
from lesion_ray.spec import JobSpec, OutputUri, Pair

# Share of the 2,594 ISIC 2018 training images whose Task 2 mask for the attribute is not empty.
ATTRIBUTE_RATES = {
    "pigment_network": 0.587,
    "negative_network": 0.073,
    "streaks": 0.039,
    "milia_like_cyst": 0.263,
    "globules": 0.232,
}
SKIN_TONES = np.array([[0.93, 0.78, 0.68], [0.87, 0.69, 0.57], [0.78, 0.58, 0.45], [0.64, 0.45, 0.33]], np.float32)
LESION_TONES = np.array([[0.62, 0.42, 0.28], [0.45, 0.28, 0.18], [0.28, 0.17, 0.11], [0.44, 0.42, 0.5]], np.float32)

# (input, Task 1, Task 2) folders per subset, named as discovery expects (Training's Task 2 ends in _v3).
SUBSET_FOLDERS = {
    subset: (FOLDERS["input"].format(subset=subset), FOLDERS["task1"].format(subset=subset),
             FOLDERS["task2"].format(subset=subset) + ("_v3" if subset == "Training" else ""))
    for subset in ("Training", "Validation")
}


class SynthSpec(JobSpec):
    kind: Literal["synth"] = "synth"
    output: OutputUri
    num_images: int = Field(100, ge=1, description="training images (ISIC2018_Task1-2_Training_Input)")
    seed: int = Field(0, ge=0, description="the same seed gives the same data set")
    validation_images: int = Field(20, ge=0, description="held-out images with ground truth (Validation subset)")
    width: Pair[Annotated[int, Field(ge=32, le=8192)]] = Field(
        (300, 450), description="range of image widths in pixels")
    aspect: Pair[Annotated[float, Field(ge=0.2, le=5.0)]] = Field(
        (0.66, 0.75), description="range of height/width (ISIC ~2:3)")
    tasks: list[Literal[1, 2]] = Field(
        [1, 2], description="which ground truth to write: 1 (lesion) and/or 2 (attributes)")
    dermoscope_corners: float = Field(0.3, ge=0.0, le=1.0, description="share of images with dark corners (0: none)")
    max_hairs: int = Field(8, ge=0, le=100, description="at most this many hairs per image")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the input images")

    @model_validator(mode="after")
    def _ranges(self) -> SynthSpec:
        for key in ("width", "aspect"):
            low, high = getattr(self, key)
            if low > high:
                raise PydanticCustomError("rule", f"expected [low, high], got [{low}, {high}]", {"key": key})
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise PydanticCustomError("rule", "expected [1], [2] or [1, 2]", {"key": "tasks"})
        return self


SPEC = SynthSpec


@dataclass
class Rendered:
    image: np.ndarray  # uint8 HxWx3
    segmentation: np.ndarray  # uint8 HxW, 0/255
    attributes: dict[str, np.ndarray]  # name -> uint8 HxW, 0/255 (all zero when absent)


@dataclass
class _Lesion:
    mask: np.ndarray  # bool HxW
    cx: float
    cy: float
    angles: np.ndarray  # polygon vertex angles
    radii: np.ndarray  # polygon vertex radii

    def box(self, margin: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1): the lesion's bounding box grown by ``margin``, within the image."""
        h, w = self.mask.shape
        r = self.radii.max() + margin
        return (
            max(0, int(self.cy - r)),
            min(h, int(self.cy + r) + 1),
            max(0, int(self.cx - r)),
            min(w, int(self.cx + r) + 1),
        )


# --- Drawing ---------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field, about unit variance, varying over ``cells`` cells along the long side."""
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, cells)
    grid = Image.fromarray(rng.standard_normal((ch, cw)).astype(np.float32), "F")
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC))


def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.05, 3).astype(np.float32)
    gx, gy = rng.uniform(-0.25, 0.25, 2).astype(np.float32)
    ramp = gx * np.linspace(-0.5, 0.5, w, dtype=np.float32) + gy * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    light = 1 + 0.08 * _smooth_noise(rng, h, w, 3) + ramp
    grain = rng.integers(0, 256, (h, w), np.uint8).astype(np.float32) * np.float32(0.07 / 255) - np.float32(0.035)
    texture = 0.035 * _smooth_noise(rng, h, w, max(4, w // 12)) + grain
    return tone * (light * (1 + texture))[..., None]


def _points(xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """PIL's flat [x0, y0, x1, y1, ...] from coordinate arrays."""
    return np.stack([xs, ys], 1).ravel().tolist()


def _lesion(rng: np.random.Generator, h: int, w: int) -> _Lesion:
    """A star-shaped polygon around a point near the centre: contiguous and without holes."""
    side = min(h, w)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * side, h / 2 + rng.uniform(-0.06, 0.06) * side
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    k = np.arange(2, 9)[:, None]
    wobble = (rng.uniform(0, 0.22, (7, 1)) / k * np.cos(k * angles + rng.uniform(0, 2 * np.pi, (7, 1)))).sum(0)
    radii = rng.uniform(0.18, 0.34) * side * np.clip(1 + wobble, 0.55, 1.45)
    canvas = Image.new("L", (w, h))
    ImageDraw.Draw(canvas).polygon(_points(cx + radii * np.cos(angles), cy + radii * np.sin(angles)), fill=255)
    return _Lesion(np.asarray(canvas) > 0, cx, cy, angles, radii)


def _paint_lesion(rng: np.random.Generator, img: np.ndarray, lesion: _Lesion) -> None:
    """Blend lesion colours, mixed by noise and darker towards the centre, with a soft edge."""
    side = min(lesion.mask.shape)
    blur = rng.uniform(0.004, 0.012) * side
    y0, y1, x0, x1 = lesion.box(margin=math.ceil(3 * blur) + 1)
    h, w = y1 - y0, x1 - x0
    first = int(rng.integers(3))  # a brown outside; the blue-grey tone (regression) only inside
    outer, inner = LESION_TONES[first], LESION_TONES[(first + rng.integers(1, 4)) % 4]
    yy, xx = np.ogrid[y0:y1, x0:x1]
    centre = (np.hypot(xx - lesion.cx, yy - lesion.cy) / lesion.radii.mean()).astype(np.float32)
    mix = np.clip(0.5 + 0.35 * _smooth_noise(rng, h, w, 5) + 0.4 * (1 - centre), 0, 1)[..., None]
    colour = outer * (1 - mix) + inner * mix
    edge = Image.fromarray(lesion.mask[y0:y1, x0:x1].astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(blur))
    alpha = (np.asarray(edge, np.float32) * np.float32(rng.uniform(0.75, 0.95) / 255))[..., None]
    patch = img[y0:y1, x0:x1]
    patch *= 1 - alpha
    patch += alpha * colour


def _lesion_points(rng: np.random.Generator, lesion: _Lesion, n: int) -> np.ndarray:
    ys, xs = np.nonzero(lesion.mask)
    pick = rng.integers(len(xs), size=n)
    return np.stack([xs[pick], ys[pick]], 1)


def _network(rng: np.random.Generator, lesion: _Lesion) -> np.ndarray:
    """Wavy grid lines through a patch of the lesion (the patch's centre is always on a line)."""
    h, w = lesion.mask.shape
    ((px, py),) = _lesion_points(rng, lesion, 1)
    reach = rng.uniform(0.4, 0.9) * lesion.radii.mean()
    step = max(4.0, rng.uniform(0.025, 0.045) * min(h, w))
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    line_width = max(1, round(step / 5))
    offsets = np.arange(-reach, reach + 1, step)
    t = np.linspace(-reach, reach, 24)
    for off in offsets:
        jitter = rng.normal(0, step / 8, (2, t.size))
        draw.line(_points(px + t, py + off + jitter[0]), fill=255, width=line_width)
        draw.line(_points(px + off + jitter[1], py + t), fill=255, width=line_width)
    patch = Image.new("L", (w, h))
    ImageDraw.Draw(patch).ellipse([px - reach, py - reach, px + reach, py + reach], fill=255)
    return (np.asarray(canvas) > 0) & (np.asarray(patch) > 0)


def _streaks(rng: np.random.Generator, lesion: _Lesion) -> np.ndarray:
    """Radial lines from inside the border outwards, along one arc of the lesion."""
    h, w = lesion.mask.shape
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    start = rng.integers(lesion.angles.size)
    for i in range(start, start + rng.integers(15, 60), 3):
        a, r = lesion.angles[i % lesion.angles.size], lesion.radii[i % lesion.angles.size]
        inner, outer = r * rng.uniform(0.55, 0.75), r * 1.05
        draw.line(
            [
                (lesion.cx + inner * math.cos(a), lesion.cy + inner * math.sin(a)),
                (lesion.cx + outer * math.cos(a), lesion.cy + outer * math.sin(a)),
            ],
            fill=255,
            width=2,
        )
    return np.asarray(canvas) > 0


def _dots(rng: np.random.Generator, lesion: _Lesion, count: tuple[int, int], size: tuple[float, float]) -> np.ndarray:
    """Round dots centred on lesion pixels; ``size`` is the radius range as a share of the image."""
    h, w = lesion.mask.shape
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    for x, y in _lesion_points(rng, lesion, int(rng.integers(*count))):
        r = max(1.0, rng.uniform(*size) * min(h, w))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(canvas) > 0


def _structure(rng: np.random.Generator, name: str, lesion: _Lesion) -> tuple[np.ndarray, np.ndarray]:
    """(mask inside the lesion, RGB colour the structure is painted with)."""
    shapes = {
        "pigment_network": (lambda: _network(rng, lesion), (0.22, 0.13, 0.08)),
        "negative_network": (lambda: _network(rng, lesion), (0.85, 0.72, 0.62)),
        "streaks": (lambda: _streaks(rng, lesion), (0.2, 0.12, 0.08)),
        "milia_like_cyst": (lambda: _dots(rng, lesion, (2, 10), (0.006, 0.014)), (0.95, 0.92, 0.8)),
        "globules": (lambda: _dots(rng, lesion, (4, 25), (0.008, 0.02)), (0.18, 0.1, 0.07)),
    }
    draw, colour = shapes[name]
    return draw() & lesion.mask, np.array(colour, np.float32)


def _hairs(rng: np.random.Generator, img: np.ndarray, max_hairs: int) -> None:
    h, w = img.shape[:2]
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    t = np.linspace(0, 1, 16)[:, None]
    for _ in range(rng.integers(0, max_hairs + 1)):
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * (w, h)
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        width = max(1, round(rng.uniform(0.002, 0.007) * min(h, w)))
        draw.line(curve.ravel().tolist(), fill=int(rng.integers(150, 256)), width=width)
    alpha = np.asarray(canvas.filter(ImageFilter.BoxBlur(0.6)))
    ys, xs = np.nonzero(alpha)  # hairs cover a few percent of the image: blend only there
    a = alpha[ys, xs, None].astype(np.float32) * np.float32(1 / 255)
    img[ys, xs] = img[ys, xs] * (1 - a) + a * np.float32(rng.uniform(0.05, 0.2))


def _dark_corners(rng: np.random.Generator, img: np.ndarray) -> None:
    """The round field of view of a contact dermoscope: black beyond a circle."""
    h, w = img.shape[:2]
    dx = np.linspace(-1, 1, w, dtype=np.float32) * np.float32(w / math.hypot(w, h))
    dy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * np.float32(h / math.hypot(w, h))
    distance = np.sqrt(dx**2 + dy**2)  # 1 at the corners
    radius, soft = np.float32(rng.uniform(0.8, 0.97)), np.float32(rng.uniform(0.03, 0.1))
    img *= np.clip((radius - distance) / soft, 0.03, 1)[..., None]


def present_attributes(rng: np.random.Generator) -> list[str]:
    """Which attributes an image shows, each drawn with its ISIC 2018 frequency."""
    return [name for name in ATTRIBUTES if rng.random() < ATTRIBUTE_RATES[name]]


def image_size(rng: np.random.Generator, spec: SynthSpec) -> tuple[int, int]:
    width = int(rng.integers(spec.width[0], spec.width[1] + 1))
    return max(16, round(width * rng.uniform(*spec.aspect))), width


def render(spec: SynthSpec, index: int) -> Rendered:
    """Image ``index`` of the data set ``spec`` describes (the same for the same seed)."""
    rng = np.random.default_rng([spec.seed, index])
    h, w = image_size(rng, spec)
    img = _skin(rng, h, w)
    lesion = _lesion(rng, h, w)
    _paint_lesion(rng, img, lesion)
    attributes = {name: np.zeros((h, w), np.uint8) for name in ATTRIBUTES}
    for name in present_attributes(rng):
        mask, colour = _structure(rng, name, lesion)
        strength = np.float32(rng.uniform(0.55, 0.85))
        img[mask] = img[mask] * (1 - strength) + colour * strength
        attributes[name] = mask.astype(np.uint8) * 255
    _hairs(rng, img, spec.max_hairs)
    if rng.random() < spec.dermoscope_corners:
        _dark_corners(rng, img)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Rendered(image, lesion.mask.astype(np.uint8) * 255, attributes)


# --- Writing ---------------------------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **options)
    return buf.getvalue()


def subset_of(spec: SynthSpec, index: int) -> str:
    return "Training" if index < spec.num_images else "Validation"


def write_image(spec: SynthSpec, index: int) -> int:
    """Render image ``index`` and write it with its masks; returns the number of files written."""
    out = render(spec, index)
    sample = f"ISIC_{index:07d}"
    images, task1, task2 = (storage.join(spec.output, f) for f in SUBSET_FOLDERS[subset_of(spec, index)])
    files = {storage.join(images, f"{sample}.jpg"): _encode(out.image, "JPEG", quality=spec.jpeg_quality)}
    if 1 in spec.tasks:
        files[storage.join(task1, f"{sample}_segmentation.png")] = _encode(out.segmentation, "PNG", compress_level=1)
    if 2 in spec.tasks:
        for name, mask in out.attributes.items():
            files[storage.join(task2, f"{sample}_attribute_{name}.png")] = _encode(mask, "PNG", compress_level=1)
    for uri, data in files.items():
        storage.write_bytes(uri, data)
    return len(files)


def _write_batch(batch: dict[str, np.ndarray], spec: SynthSpec) -> dict[str, np.ndarray]:
    files = storage.concurrently(lambda index: write_image(spec, int(index)), batch["id"])
    return {"id": batch["id"], "files": np.array(files)}


def run(spec: SynthSpec, settings: Settings) -> dict[str, Any]:
    """Generate ``num_images`` training and ``validation_images`` validation images on Ray."""
    total = spec.num_images + spec.validation_images
    if storage.exists(storage.join(spec.output, SUBSET_FOLDERS["Training"][0])):
        report.info(f"{spec.output} already holds a data set: images with the same ids are overwritten and the "
                    "others stay (with other num_images or validation_images, use an empty output folder)")
    start = time.monotonic()
    tasks = preprocess.task_pool()
    # The read capped as the writing: uncapped, its tiny tasks would start a process per logical CPU.
    ds = ray.data.range(total, override_num_blocks=min(max(1, total // 8), 1000), concurrency=tasks.size)
    ds = ds.map_batches(_write_batch, batch_size=8, fn_kwargs={"spec": spec}, compute=tasks)
    files = sum(int(row["files"]) for row in report.progress(ds.iter_rows(), total, "synth images"))
    seconds = time.monotonic() - start
    return {
        "output": storage.normalize(spec.output),
        "training_images": spec.num_images,
        "validation_images": spec.validation_images,
        "tasks": ", ".join(str(t) for t in spec.tasks),
        "files": files,
        "seconds": round(seconds, 1),
        "images_per_s": round(total / seconds, 1),
    }
