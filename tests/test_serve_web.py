"""The web page in headless Chromium: choose an image, see the served mask drawn over it."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from lesion_ray import postprocess, registry
from lesion_ray import serve as lserve
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.registry import ModelRef
from lesion_ray.serve import deployment, ingress
from lesion_ray.testing import wait_for
from lesion_ray.testing.loopback import free_port

CONFIG = ModelConfig(architecture="unet", task=1, input_size=32, num_filters=4, depth=2)
TOKEN = "web-test-token"
# app.js tints the lesion as the service's overlays do (its opacity slider starts at the same alpha).
ALPHA, TINT = postprocess.OVERLAY_ALPHA, np.array(postprocess.OVERLAY_COLOURS[1][0])


def picture() -> bytes:
    """160x120 PNG: skin with a dark lesion (PNG, so the browser draws exactly these pixels)."""
    yy, xx = np.mgrid[:120, :160]
    inside = ((xx - 80) / 50) ** 2 + ((yy - 60) / 35) ** 2 < 1
    buf = io.BytesIO()
    Image.fromarray(np.where(inside[..., None], [70, 45, 35], [205, 160, 130]).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(ray_local, settings, tmp_path_factory):
    from ray import serve

    work = tmp_path_factory.mktemp("web")
    torch.manual_seed(0)
    folder, registry_uri = str(work / "model"), str(work / "registry")
    state = registry.plain_state_dict(build_model(CONFIG))
    registry.save_model_dir(folder, state, registry.config_to_json(CONFIG, 0.5))
    registry.publish(folder, "lesion", {}, registry_uri)
    # An untrained net answers nearly the same probability everywhere: cut at its median for a mixed mask.
    loaded = registry.load_model("lesion@1", registry_uri)
    x, _ = ingress.prepare(picture(), 10**7, CONFIG.input_size)
    threshold = float(np.median(deployment.forward(deployment.Served.of(loaded), [x])[0].probs))
    (work / "token").write_text(TOKEN)
    port = free_port()
    spec = lserve.ServeSpec(kind="serve", name="lesion-web", model=ModelRef("lesion@1"), registry=registry_uri,
                            max_replicas=1, threshold=threshold, auth_token_file=str(work / "token"), port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(lserve.build_app(spec, settings), name=spec.name, route_prefix="/lesion")
    yield {"url": f"http://127.0.0.1:{port}/lesion", "work": work}
    serve.shutdown()


def test_page_draws_the_served_mask_over_the_uploaded_image(browser, app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    image_path = app["work"] / "lesion.png"
    image_path.write_bytes(picture())
    browser.get(app["url"])  # no trailing slash: the page redirects so its relative URLs resolve
    model = browser.find_element(By.ID, "model")
    wait_for("the page to ask for the token", lambda: "enter the token" in model.text, 60)
    browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.TAB)
    wait_for("the page to name the model", lambda: "lesion@1" in model.text, 60)
    browser.find_element(By.ID, "file").send_keys(str(image_path))
    canvas = browser.find_element(By.ID, "view")
    wait_for("the page to draw the answer", lambda: canvas.get_attribute("data-state") in ("overlay", "error"), 60)
    assert canvas.get_attribute("data-state") == "overlay", browser.find_element(By.ID, "status").text
    assert "lesion" in browser.find_element(By.ID, "attributes").text

    drawn = browser.execute_script(
        "const c = document.getElementById('view');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    width, height, pixels = drawn
    drawn = np.array(pixels, np.float64).reshape(height, width, 4)[..., :3]
    answer = httpx.post(app["url"] + "/v1/segment?format=json", content=picture(),
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"])))) > 127
    assert (width, height) == (160, 120) and 0.05 < mask.mean() < 0.95
    original = np.asarray(Image.open(io.BytesIO(picture())), np.float64)
    expected = np.where(mask[..., None], original * (1 - ALPHA) + TINT * ALPHA, original)
    assert np.abs(drawn - expected).max() <= 2  # tinted exactly where the service's mask says lesion
