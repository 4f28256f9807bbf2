"""kind: serve, over real HTTP against a running Ray Serve app (tiny U-Nets in a tmp registry)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from lesion_ray import cli, postprocess, registry
from lesion_ray import serve as lserve
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.registry import LoadedModel, ModelRef
from lesion_ray.serve import config as serve_config
from lesion_ray.serve import deployment, ingress
from lesion_ray.spec import CheckContext, SpecError, from_dict
from lesion_ray.testing import wait_for
from lesion_ray.testing.loopback import free_port

CONFIG = ModelConfig(architecture="unet", task=1, input_size=32, num_filters=4, depth=2)
TOKEN = "s3cret-token-for-tests"
MAX_UPLOAD = 300_000
MAX_REQUEST_PIXELS = 1_000_000
TIMEOUT_S = 10.0


def lesion_image(size: tuple[int, int] = (90, 60), fmt: str = "PNG") -> bytes:
    """A skin-coloured picture (width, height) with a dark ellipse, encoded as ``fmt``."""
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 < 1
    pixels = np.where(inside[..., None], [70, 45, 35], [205, 160, 130]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """An all-black greyscale PNG: megapixels in a few kB."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def publish_unet(registry_uri: str, work: Path, seed: int, broken: bool = False) -> str:
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    if broken:
        torch.nn.init.constant_(model.final.weight, float("nan"))
    folder = str(work / f"model-{seed}-{broken}")
    registry.save_model_dir(folder, registry.plain_state_dict(model), registry.config_to_json(CONFIG, 0.5))
    return registry.publish(folder, "lesion", {"val_jaccard": 0.1 * seed}, registry_uri)


def png_array(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


@pytest.fixture(scope="module")
def app(ray_local, settings, tmp_path_factory):
    """``run(spec, settings)`` serving lesion@latest in a thread until its ``stop`` event is set."""

    work = tmp_path_factory.mktemp("serve")
    registry_uri = str(work / "registry")
    publish_unet(registry_uri, work, seed=1)
    (work / "token").write_text(TOKEN + "\n")
    spec = lserve.ServeSpec(
        kind="serve", name="lesion-test", model=ModelRef("lesion@latest"), registry=registry_uri,
        min_replicas=1, max_replicas=1, max_batch_size=8, max_ongoing_requests=8, batch_wait_timeout_s=0.005,
        max_upload_bytes=MAX_UPLOAD, max_pixels=4_000_000, max_request_pixels=MAX_REQUEST_PIXELS,
        max_concurrent_decodes=2, max_queued_requests=4, request_timeout_s=TIMEOUT_S,
        auth_token_file=str(work / "token"), port=free_port(), poll_latest_s=0.5,
    )
    summary: dict = {}
    stop = threading.Event()
    thread = threading.Thread(target=lambda: summary.update(lserve.run(spec, settings, stop)), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{spec.port}/"

    def healthy() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(base + "healthz", timeout=5).status_code == 200
        return False

    wait_for("the Serve app to become healthy", healthy, 240)
    yield {"url": base, "spec": spec, "registry": registry_uri, "work": work}
    stop.set()
    thread.join(timeout=120)
    assert summary["stopped_by"] == "stop requested" and summary["model"] == "lesion@1"  # run() shut Serve down


@pytest.fixture
def client(app):
    with httpx.Client(base_url=app["url"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def direct_mask(app, data: bytes) -> np.ndarray:
    """The same image through the model called in-process: what the service must answer."""
    loaded = registry.load_model("lesion@latest", app["registry"])
    x, orig = ingress.prepare(data, 4_000_000, loaded.config.input_size)
    return deployment.masks_at(deployment.forward(deployment.Served.of(loaded), [x])[0], orig).any(0)


# --- Without a server -------------------------------------------------------------------------


def test_spec_rules_and_serve_config(tmp_path):
    base = {"kind": "serve", "name": "s", "model": "lesion@latest"}
    for bad, key in (({"route_prefix": "api"}, "route_prefix"),
                     ({"max_replicas": 1, "min_replicas": 2}, "max_replicas"),
                     ({"auth_token_env": "my token!"}, "auth_token_env"),
                     ({"auth_token_env": "a3f9c1d27e"}, "auth_token_env"),  # a token where its variable's name goes
                     ({"auth_token_env": "T", "auth_token_file": "/t"}, "auth_token_env"),
                     ({"max_batch_size": 32, "max_ongoing_requests": 8}, "max_ongoing_requests")):
        with pytest.raises(SpecError, match=key):
            from_dict(lserve.ServeSpec, base | bad, "t.yaml")
    with pytest.raises(SpecError, match="unknown key"):
        from_dict(lserve.ServeSpec, base | {"auth_token": "abc"}, "t.yaml")
    spec = from_dict(lserve.ServeSpec, base | {"auth_token_env": "LESION_TOKEN", "registry": str(tmp_path)}, "t.yaml")
    with pytest.raises(SpecError, match="not in the registry"):
        spec.check(CheckContext("t.yaml"))
    spec.check(CheckContext("t.yaml", produced=["model:lesion"]))  # an earlier pipeline step trains it
    config = lserve.serve_config(spec)
    (application,) = config["applications"]
    assert application["import_path"] == "lesion_ray.serve:app_builder"
    assert application["args"]["auth_token_env"] == "LESION_TOKEN"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 60.0}
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay's serveConfigV2 accept
    assert isinstance(lserve.app_builder(application["args"]), Application)


def test_non_loopback_host_needs_a_token_or_allow_unauthenticated(capsys):
    base = {"kind": "serve", "name": "s", "model": "lesion@latest"}
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost"):
        from_dict(lserve.ServeSpec, base | {"host": host}, "t.yaml")
    for host in ("0.0.0.0", "::", "10.1.2.3", "128.0.0.1", "lesion.example.org"):
        with pytest.raises(SpecError, match="^t.yaml: host: .*auth_token_env or auth_token_file, or "
                                            "allow_unauthenticated: true"):
            from_dict(lserve.ServeSpec, base | {"host": host}, "t.yaml")
        for allowed in ({"auth_token_env": "LESION_TOKEN"}, {"auth_token_file": "/run/token"},
                        {"allow_unauthenticated": True}):
            from_dict(lserve.ServeSpec, base | {"host": host} | allowed, "t.yaml")
    # Serve config files build the app through app_builder, which refuses the same spec.
    with pytest.raises(SpecError, match="host"):
        lserve.app_builder(base | {"host": "0.0.0.0"})
    assert cli.main(["validate", "jobs/serve.yaml", "host=0.0.0.0", "auth_token_env=null"]) == 2
    assert capsys.readouterr().err.startswith("error: jobs/serve.yaml: host: 0.0.0.0 accepts connections")


def test_token_from_env_or_file(tmp_path, monkeypatch):
    spec = lserve.ServeSpec(kind="serve", name="s", model=ModelRef("m@1"), auth_token_env="LESION_TEST_TOKEN")
    monkeypatch.delenv("LESION_TEST_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="LESION_TEST_TOKEN is not set"):
        serve_config.read_token(spec)
    monkeypatch.setenv("LESION_TEST_TOKEN", " abc \n")
    assert serve_config.read_token(spec) == b"abc"
    (tmp_path / "t").write_text("")
    with pytest.raises(RuntimeError, match="empty"):
        serve_config.read_token(lserve.ServeSpec(kind="serve", name="s", model=ModelRef("m@1"),
                                           auth_token_file=str(tmp_path / "t")))
    assert serve_config.read_token(lserve.ServeSpec(kind="serve", name="s", model=ModelRef("m@1"))) is None


def test_check_model_fails_on_nan_weights():
    model = build_model(CONFIG).eval()
    served = deployment.Served.of(LoadedModel(model, CONFIG, 0.5, "m", "1", {}, "mem"))
    deployment.check_model(served)
    torch.nn.init.constant_(model.final.bias, float("nan"))
    with pytest.raises(RuntimeError, match="NaN"):
        deployment.check_model(served)


def test_a_batch_prepared_for_two_input_sizes_is_answered_at_the_models_size():
    # Around a swap to a version with another input size, the ingress prepares some images for the old size.
    torch.manual_seed(0)
    served = deployment.Served.of(LoadedModel(build_model(CONFIG).eval(), CONFIG, 0.5, "lesion", "2", {}, "m"))
    inputs = [np.full((3, 32, 32), 128, np.uint8), np.full((3, 48, 48), 128, np.uint8)]
    first, second = deployment.forward(served, inputs)
    assert first.probs.shape == second.probs.shape == (1, 32, 32)
    np.testing.assert_allclose(first.probs, second.probs, atol=1e-3)  # the same grey image at either size


def test_masks_at_resizes_then_thresholds():
    probs = np.zeros((1, 4, 4), np.float16)
    probs[0, :, :2] = 0.9
    pred = deployment.Prediction(probs, [0.7], 0.5, "m", "1", 1, 4)
    mask = deployment.masks_at(pred, (30, 40))
    assert mask.shape == (1, 30, 40)
    assert mask[0, :, :18].all() and not mask[0, :, 22:].any()


def test_masks_at_post_processes_task1_as_predict_does():
    probs = np.zeros((1, 8, 8), np.float16)
    probs[0, 1:6, 1:6] = 0.9
    probs[0, 3, 3] = 0.1  # a hole
    probs[0, 7, 7] = 0.9  # a stray blob
    pred = deployment.Prediction(probs, [0.7], 0.5, "m", "1", 1, 8)  # postprocess: largest_component, the default
    mask = deployment.masks_at(pred, (24, 24))[0]
    raw = deployment.masks_at(dataclasses.replace(pred, postprocess="none"), (24, 24))[0]
    assert raw[22:, 22:].any() and not mask[22:, 22:].any()  # the stray blob is dropped
    assert not raw[9:12, 9:12].all() and mask[9:12, 9:12].all()  # the hole is filled
    assert np.array_equal(mask, postprocess.to_masks(probs, 24, 24, 0.5, "largest_component")[0])


# --- Over HTTP ---------------------------------------------------------------------------------


def test_raw_upload_gives_png_mask_at_original_size(app, client):
    data = lesion_image((90, 60))
    r = client.post("v1/segment", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-model"] == "lesion@1"
    mask = png_array(r.content)
    assert mask.shape == (60, 90) and set(np.unique(mask)) <= {0, 255}
    assert ((mask > 127) != direct_mask(app, data)).mean() < 0.001


def test_multipart_and_jpeg_upload(app, client):
    data = lesion_image((64, 80), "JPEG")
    r = client.post("v1/segment", files={"file": ("lesion.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    mask = png_array(r.content)
    assert mask.shape == (80, 64)
    assert ((mask > 127) != direct_mask(app, data)).mean() < 0.001


def test_json_and_overlay(client):
    data = lesion_image((90, 60))
    body = client.post("v1/segment?format=json", content=data).json()
    assert body["model"] == {"name": "lesion", "version": "1"} and (body["height"], body["width"]) == (60, 90)
    mask = png_array(base64.b64decode(body["mask"])) > 127
    assert body["lesion_area_fraction"] == pytest.approx(mask.mean())
    assert set(body["attributes"]) == {"lesion"} and 0 <= body["attributes"]["lesion"] <= 1
    r = client.post("v1/segment?overlay=true", content=data)
    assert r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (90, 60)


def test_tutorial_predict_round_trip_with_several_rows(client):
    images = [lesion_image((90, 60)), lesion_image((40, 50), "JPEG"), lesion_image((33, 33))]
    kinds = ["png", "jpeg", "png"]
    rows = [{"image": data_uri(d, k)} for k, d in zip(kinds, images, strict=True)]
    r = client.post("v1/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    out = r.json()["rows"]
    assert len(out) == 3
    for row, data in zip(out, images, strict=True):
        assert row["mask"].startswith("data:image/png;base64,")
        mask = png_array(base64.b64decode(row["mask"].split(",", 1)[1]))
        assert mask.shape == Image.open(io.BytesIO(data)).size[::-1]
        assert np.array_equal(mask, png_array(client.post("v1/segment", content=data).content))


def chunks(size: int):
    for _ in range(size // 65536 + 1):
        yield b"\0" * 65536


BAD_INPUTS = [
    ("not an image", "v1/segment", {"content": b"hello, world" * 10, "headers": {"Content-Type": "image/jpeg"}}, 415),
    ("text content type", "v1/segment", {"content": lesion_image(), "headers": {"Content-Type": "text/plain"}}, 415),
    ("truncated jpeg", "v1/segment", {"content": lesion_image((200, 200), "JPEG")[:800]}, 422),
    ("empty body", "v1/segment", {"content": b""}, 422),
    ("over max_upload_bytes", "v1/segment", {"content": b"\xff" * (MAX_UPLOAD + 1)}, 413),
    ("chunked over limit", "v1/segment", {"content": chunks(MAX_UPLOAD)}, 413),
    ("decompression bomb", "v1/segment", {"content": blank_png(3000, 3000)}, 413),  # over max_pixels=4M
    ("multipart without file", "v1/segment", {"data": {"name": "x"}, "files": {"other": ("", b"", "text/plain")}},
     422),
    ("bad format", "v1/segment?format=tiff", {"content": lesion_image()}, 422),
    ("malformed json", "v1/predict", {"content": b"{rows: [", "headers": {"Content-Type": "application/json"}}, 400),
    ("deeply nested json", "v1/predict", {"content": b'{"rows": ' + b"[" * 100_000}, 400),
    ("nested json within the parser's depth", "v1/predict", {"content": b'{"rows": ' + b"[" * 200 + b"]" * 200 + b"}"},
     422),
    ("json integer of 5000 digits", "v1/predict", {"content": b'{"rows": ' + b"7" * 5000 + b"}"}, 400),
    ("json without rows", "v1/predict", {"json": {"images": []}}, 422),
    ("gif data uri", "v1/predict", {"json": {"rows": [{"image": "data:image/gif;base64,R0lGOD=="}]}}, 415),
    ("bad base64", "v1/predict", {"json": {"rows": [{"image": "data:image/png;base64,@@@"}]}}, 422),
    ("corrupt row", "v1/predict", {"json": {"rows": [{"image": data_uri(lesion_image())},
                                                      {"image": data_uri(lesion_image()[:60])}]}}, 422),
]


@pytest.mark.parametrize(("case", "path", "kwargs", "status"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_json_client_error(client, case, path, kwargs, status):
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error and "Traceback" not in r.text and 'File "' not in r.text
    if case == "corrupt row":
        assert "rows[1].image" in error
    if case == "decompression bomb":
        assert "max_pixels" in error
    if case == "deeply nested json":
        assert "nested too deeply" in error


def test_pixel_budget_is_read_from_the_headers(client):
    """max_request_pixels counts every image of a request: one upload, or all rows together."""
    at_limit, over = blank_png(1000, 1000), blank_png(1000, 1001)
    assert client.post("v1/segment", content=at_limit).status_code == 200
    assert client.post("v1/segment", files={"file": ("x.png", at_limit, "image/png")}).status_code == 200
    r = client.post("v1/segment", content=over)
    assert r.status_code == 413 and "1,001,000 pixels, more than max_request_pixels=1,000,000" in r.json()["error"]
    halves = [blank_png(500, 1000), blank_png(500, 1000)]
    assert client.post("v1/predict", json={"rows": [{"image": data_uri(d)} for d in halves]}).status_code == 200
    halves[1] = blank_png(500, 1001)
    r = client.post("v1/predict", json={"rows": [{"image": data_uri(d)} for d in halves]})
    assert r.status_code == 413 and "max_request_pixels" in r.json()["error"]


def test_row_limit(app, client):
    rows = [{"image": data_uri(lesion_image((20, 20)))}] * app["spec"].max_rows
    assert client.post("v1/predict", json={"rows": rows}).status_code == 200
    r = client.post("v1/predict", json={"rows": [*rows, rows[0]]})
    assert r.status_code == 413 and r.json()["error"].startswith("17 rows, more than max_rows=16")


def test_multipart_part_limit(client):
    image = ("lesion.png", lesion_image(), "image/png")
    fields = {f"field{i}": "x" for i in range(ingress.MAX_FORM_PARTS - 1)}
    assert client.post("v1/segment", data=fields, files={"file": image}).status_code == 200
    r = client.post("v1/segment", data=fields | {"one_more": "x"}, files={"file": image})
    assert r.status_code == 413 and "more than 16 parts" in r.json()["error"]
    # 20,000 empty parts: refused from a count of the boundaries, before any part is parsed.
    form = {"Content-Type": "multipart/form-data; boundary=B"}
    started = time.monotonic()
    r = client.post("v1/segment", content=b"--B\r\n\r\n\r\n" * 20_000 + b"--B--\r\n", headers=form)
    assert r.status_code == 413 and time.monotonic() - started < 5
    # A part's headers: python-multipart's bounds (8 lines of 4,224 bytes), just under and just over each.
    def part(*headers: bytes) -> bytes:
        disposition = b'Content-Disposition: form-data; name="file"; filename="lesion.png"\r\n'
        return b"--B\r\n" + disposition + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + image[1] + b"\r\n--B--\r\n"

    pad = b"X-Pad: " + b"a" * (DEFAULT_MAX_HEADER_SIZE - len(b"X-Pad: "))  # a line of 4,224 bytes
    assert client.post("v1/segment", content=part(pad), headers=form).status_code == 200
    r = client.post("v1/segment", content=part(pad + b"a"), headers=form)
    assert r.status_code == 400 and "Maximum header size exceeded" in r.json()["error"]
    lines = [b"X-%d: a" % i for i in range(DEFAULT_MAX_HEADER_COUNT)]  # Content-Disposition is one more
    assert client.post("v1/segment", content=part(*lines[:-1]), headers=form).status_code == 200
    r = client.post("v1/segment", content=part(*lines), headers=form)
    assert r.status_code == 400 and "Maximum header count exceeded" in r.json()["error"]


def test_full_queue_answers_503_at_once(app, client):
    """max_ongoing_requests uploads held open by their clients fill the ingress replica and
    max_queued_requests more wait in the proxy (just under): all succeed once released. One more
    request (just over) gets 503 at once instead of waiting."""
    spec, data = app["spec"], lesion_image()

    async def scenario() -> tuple[httpx.Response, float, list[int]]:
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=app["url"], headers=client.headers, timeout=60) as c:
            async def held() -> int:
                async def body():
                    yield data[:10]
                    await release.wait()
                    yield data[10:]
                return (await c.post("v1/segment", content=body())).status_code

            tasks = []
            for _ in range(spec.max_ongoing_requests + spec.max_queued_requests):
                tasks.append(asyncio.create_task(held()))
                await asyncio.sleep(0.1)  # one at a time: Serve may refuse requests that arrive together
            await asyncio.sleep(1.0)
            started = time.monotonic()
            extra = await c.post("v1/segment", content=data)
            waited = time.monotonic() - started
            release.set()
            return extra, waited, list(await asyncio.gather(*tasks))

    extra, waited, held_statuses = asyncio.run(scenario())
    assert extra.status_code == 503 and waited < 2, (extra.status_code, waited)
    assert held_statuses == [200] * (spec.max_ongoing_requests + spec.max_queued_requests)


def test_slow_body_times_out(app):
    """A body that stops arriving gets 408 after request_timeout_s, also when the client asks Serve's
    proxy for no timeout (x-request-timeout-seconds: 0)."""
    port = app["spec"].port

    async def trickle(extra_header: str) -> tuple[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n{extra_header}\r\n"
                     "10\r\n0123456789abcdef\r\n".encode())
        await writer.drain()
        try:
            status = await asyncio.wait_for(reader.readline(), TIMEOUT_S + 15)
        finally:
            writer.close()
        return status.decode().strip(), time.monotonic() - started

    async def both() -> list[tuple[str, float]]:
        return await asyncio.gather(trickle(""), trickle("X-Request-Timeout-Seconds: 0\r\n"))

    for status, waited in asyncio.run(both()):
        assert status.startswith("HTTP/1.1 408") and TIMEOUT_S - 1 < waited < TIMEOUT_S + 10, (status, waited)


def test_64_concurrent_uploads_at_the_pixel_limit(app, client):
    """Every answer is 200 or 503 (a full queue: each upload is within the pixel limit); no more than
    max_concurrent_decodes decodes run at once; afterwards the service is healthy and answers normally."""
    data = blank_png(1000, 1000)  # MAX_REQUEST_PIXELS

    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=app["url"], headers=client.headers, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            answers = await asyncio.gather(*(c.post("v1/segment", content=data) for _ in range(64)))
        return [r.status_code for r in answers]

    started = time.monotonic()
    statuses = asyncio.run(flood())
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert time.monotonic() - started < 2 * TIMEOUT_S
    ingress = client.get("v1/model").json()["ingress"]
    assert ingress["decodes_peak"] == ingress["max_concurrent_decodes"] == 2
    assert client.get("healthz").json() == {"status": "ok"}
    assert client.post("v1/segment", content=lesion_image()).status_code == 200


def test_bad_input_leaves_the_service_healthy(client):
    for _ in range(3):
        assert client.post("v1/segment", content=b"\x89PNG\r\n\x1a\n garbage").status_code == 422
    assert client.get("healthz").json()["status"] == "ok"
    assert client.post("v1/segment", content=lesion_image()).status_code == 200


def test_a_cluster_whose_serve_listens_elsewhere_is_refused(app, settings):
    # Serve's HTTP server is the cluster's: a second app cannot have a host or port of its own.
    port = app["spec"].port
    for moved in ({"port": free_port()}, {"host": "127.0.0.2"}):
        other = app["spec"].model_copy(update={"name": "other", "route_prefix": "/other", **moved})
        with pytest.raises(ValueError, match=re.escape(f"Ray Serve already runs on this cluster at 127.0.0.1:{port}, "
                                                       f"not {other.host}:{other.port}, and its HTTP server serves")):
            lserve.run(other, settings)
        assert "other" not in serve.status().applications


def test_bearer_token_is_required(app, client):
    url = app["url"]
    data = lesion_image()
    assert httpx.post(url + "v1/segment", content=data).status_code == 401
    for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"):
        r = httpx.post(url + "v1/segment", content=data, headers={"Authorization": header})
        assert r.status_code == 401 and TOKEN not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "v1/predict", json={"rows": []}).status_code == 401
    assert httpx.get(url + "v1/model").status_code == 401
    assert httpx.get(url + "healthz").status_code == 200  # probes and the page need no token
    page = httpx.get(url)
    assert page.status_code == 200 and "<canvas" in page.text
    assert httpx.get(url + "app.js").headers["content-type"].startswith("text/javascript")


def test_model_info(client):
    info = client.get("v1/model").json()
    replica = info.pop("replica")
    assert replica.keys() == {"batches", "images", "device", "precision", "compiled"}
    assert (replica["device"], replica["precision"], replica["compiled"]) == ("cpu", "fp32", False)
    assert info.pop("ingress").keys() == {"max_concurrent_decodes", "decodes_peak"}
    assert info == {"name": "lesion", "version": "1", "task": 1, "architecture": "unet", "input_size": 32,
                    "threshold": 0.5, "postprocess": "largest_component", "labels": ["lesion"],
                    "metrics": {"val_jaccard": 0.1}, "refused_version": None}


def test_concurrent_images_share_forward_passes(client):
    before = client.get("v1/model").json()["replica"]
    rows = [{"image": data_uri(lesion_image((40 + i, 40)))} for i in range(16)]
    assert client.post("v1/predict", json={"rows": rows}).status_code == 200
    after = client.get("v1/model").json()["replica"]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 16 and batches < images  # @serve.batch put several images in one forward pass


def test_new_latest_version_switches_under_load_without_failures(app, client):
    """Publish v2 while clients send requests: every request succeeds and answers move to v2;
    a broken v3 (NaN weights) is then refused and v2 keeps serving."""
    data = lesion_image()
    results: list[tuple[int, str]] = []

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=app["url"], headers=client.headers, timeout=30) as c:
            async def worker() -> None:
                while not stop.is_set():
                    r = await c.post("v1/segment?format=json", content=data)
                    results.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text))
            await asyncio.gather(*(worker() for _ in range(4)))

    async def scenario() -> None:
        stop = asyncio.Event()
        clients = asyncio.create_task(load(stop))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(publish_unet, app["registry"], app["work"], 2)
        deadline = time.monotonic() + 30
        while sum(v == "2" for _, v in results) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        await clients

    asyncio.run(scenario())
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert versions[0] == "1" and versions[-1] == "2" and versions.count("2") >= 20
    # One model replica: once it answers v2 it never goes back (up to the 4 answers already in flight).
    assert "1" not in versions[versions.index("2") + 4:]
    publish_unet(app["registry"], app["work"], 3, broken=True)
    # The replica polls every 0.5 s: it must find v3, try it and refuse it.
    refused = wait_for("the replica to refuse v3", lambda: client.get("v1/model").json()["refused_version"], 30)
    assert refused["version"] == "3" and "NaN" in refused["reason"], refused
    assert client.get("healthz").json() == {"status": "ok"} and client.get("v1/model").json()["version"] == "2"
    assert client.post("v1/segment", content=data).headers["x-model"] == "lesion@2"
