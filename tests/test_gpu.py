"""GPU-only tests (marked ``gpu``, skipped without CUDA; CI has no GPU, so `benchmarks/gpu_suite.sh tests` runs them
on the GPU machine): the inference runner and nvJPEG decoding on the GPU, predict with bf16 and ``decode: gpu``
(a PNG and a truncated JPEG among the inputs), a Serve model replica holding a GPU, bf16 and fp16 training whose
GPU-saved checkpoint loads on a CPU, and the GPU preprocessing branch against the CPU path.

The GPU machine has neither moto nor boto3 (local folders only): there the session's S3 endpoint is switched off.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import os

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_predict import SIZES, jpeg, make_spec, publish_tiny_model, unplaced_spec
from test_serve import lesion_image, png_array, publish_unet
from test_train import _spec, isic  # noqa: F401  # isic: the module's synthetic ISIC layout (a fixture)

from lesion_ray import inference, manifest, predict, preprocess, registry, storage, train
from lesion_ray import serve as lserve
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.registry import ModelRef
from lesion_ray.testing.loopback import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if importlib.util.find_spec("moto") is None:

    @pytest.fixture(scope="session")
    def s3_endpoint() -> None:
        """No S3 endpoint where moto is not installed (the GPU machine): these tests use local folders."""
        return None


def test_runner_on_the_gpu_agrees_with_fp32_at_every_precision() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="multitask_unet", task=2, input_size=64, num_filters=8))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    reference = inference.Runner(copy.deepcopy(model), "cuda", inference.ModelRuntime(), 64, 4)(images)
    assert all(o.device.type == "cuda" for o in reference)
    for runtime, tolerance in ((inference.ModelRuntime(precision="bf16"), 0.05),
                               (inference.ModelRuntime(precision="fp16"), 0.01),
                               (inference.ModelRuntime(precision="bf16", channels_last=True), 0.05)):
        outputs = inference.Runner(copy.deepcopy(model), "cuda", runtime, 64, 4)(images)
        for out, ref in zip(outputs, reference, strict=True):
            assert out.dtype == torch.float32 and (out - ref).abs().max() < tolerance


def test_nvjpeg_decodes_the_jpegs_and_the_cpu_the_rest() -> None:
    pytest.importorskip("torchvision")
    jpegs = [lesion_image((90, 60), "JPEG"), lesion_image((64, 64), "JPEG")]
    good = [*jpegs, lesion_image((50, 40), "PNG")]
    inputs = inference.ModelInputs("cuda", 32, preprocess.DEFAULT_MAX_PIXELS)
    images, sizes, errors = inputs([*good, jpegs[0][: len(jpegs[0]) // 2]])
    assert images.device.type == "cuda" and images.dtype == torch.uint8
    assert errors[:3] == ["", "", ""] and "truncated" in errors[3]
    assert (inputs.on_gpu, inputs.on_cpu) == (2, 1)
    for i, payload in enumerate(good):
        pixels, orig = preprocess.decode_image(payload, target=32)
        expected = torch.from_numpy(preprocess.to_model_input([pixels], 32)[0])
        # nvJPEG's IDCT and upsampling differ from libjpeg's (and PIL decodes in draft mode): close, not equal.
        assert sizes[i] == orig and (images[i].cpu().float() - expected.float()).abs().mean() < 3


def test_predict_in_bf16_decoding_on_the_gpu(ray_local, settings, tmp_path, capfd) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1)
    inputs = tmp_path / "in"
    for i, (w, h) in enumerate(SIZES[:4]):
        storage.write_bytes(str(inputs / f"ISIC_000000{i}.jpg"), jpeg(w, h, i))
    Image.open(io.BytesIO(jpeg(30, 20, 8))).save(inputs / "ISIC_0000008.png")  # the CPU path in the actor
    storage.write_bytes(str(inputs / "ISIC_0000009.jpg"), jpeg(50, 40, 9)[:300])  # truncated: an error row
    keys = {"input": str(inputs), "model": ref, "registry": str(tmp_path / "registry"), "overlays": "none",
            "batch_size": 4, "precision": "bf16"}  # gpus_per_actor unset: the GPU layout
    runs = {decode: predict.run(unplaced_spec(**keys, decode=decode, output=str(tmp_path / decode)), settings)
            for decode in ("cpu", "gpu")}
    assert "x 0.5 GPU, bf16" in "".join(capfd.readouterr())
    assert all((r["ok"], r["error"]) == (5, 1) for r in runs.values())
    rows = {d: {r["id"]: r for r in pq.read_table(tmp_path / d / manifest.MANIFEST_FILE).to_pylist()} for d in runs}
    assert "truncated" in rows["gpu"]["ISIC_0000009"]["error"] and rows["gpu"]["ISIC_0000009"]["height"] == 0
    for image_id, row in rows["cpu"].items():
        if row["status"] != "ok":
            continue
        on_gpu = rows["gpu"][image_id]
        assert (on_gpu["width"], on_gpu["height"]) == (row["width"], row["height"])
        assert on_gpu["head1_prob"] == pytest.approx(row["head1_prob"], abs=0.03)
        mask = Image.open(tmp_path / "gpu" / "masks" / f"{image_id}_segmentation.png")
        assert mask.size == (row["width"], row["height"])


def test_predict_with_compile_on_the_gpu(ray_local, settings, tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=2)
    inputs = tmp_path / "in"
    for i, (w, h) in enumerate(SIZES):
        storage.write_bytes(str(inputs / f"ISIC_000000{i}.jpg"), jpeg(w, h, i))
    spec = make_spec(input=str(inputs), model=ref, registry=str(tmp_path / "registry"), output=str(tmp_path / "out"),
                     overlays="none", batch_size=4, compile=True, channels_last=True, precision="bf16")
    summary = predict.run(spec, settings)  # compiled, or uncompiled after a warning: either way every image done
    assert (summary["ok"], summary["error"]) == (len(SIZES), 0)


def test_a_serve_model_replica_holds_a_gpu(ray_local, settings, tmp_path) -> None:
    from ray import serve

    registry_uri = str(tmp_path / "registry")
    publish_unet(registry_uri, tmp_path, seed=1)
    spec = lserve.ServeSpec(kind="serve", name="gpu-test", model=ModelRef("lesion@latest"), registry=registry_uri,
                            min_replicas=1, max_replicas=1, max_batch_size=4, max_ongoing_requests=8,
                            gpus_per_replica=0.5, precision="bf16", port=free_port(), poll_latest_s=0)
    gpus = ray_local.cluster_resources()["GPU"]
    serve.start(http_options={"host": "127.0.0.1", "port": spec.port})
    try:
        serve.run(lserve.build_app(spec, settings), name=spec.name, route_prefix="/")
        assert ray_local.available_resources().get("GPU", 0) == pytest.approx(gpus - 0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{spec.port}", timeout=60) as client:
            for size in ((90, 60), (64, 64)):
                answer = client.post("/v1/segment", content=lesion_image(size), headers={"Content-Type": "image/png"})
                assert answer.status_code == 200, answer.text
                mask = png_array(answer.content)
                assert mask.shape == size[::-1] and set(np.unique(mask)) <= {0, 255}
            replica = client.get("/v1/model").json()["replica"]
            assert replica["images"] == 2 and replica["device"].startswith("cuda")
    finally:
        serve.delete(spec.name)
        serve.shutdown()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu_and_its_checkpoint_on_a_cpu(ray_local, settings, isic, tmp_path,  # noqa: F811
                                                                         precision) -> None:
    out, reg = str(tmp_path / "run"), str(tmp_path / "registry")
    summary = train.run(_spec(isic, out, reg, num_workers=1, use_gpu=True, precision=precision, channels_last=True,
                              epochs=2), settings)
    with open(os.path.join(out, "metrics.json")) as f:
        history = json.load(f)
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in history)
    checkpoint = max(os.path.join(out, d) for d in os.listdir(out)
                     if d.startswith("checkpoint_") and os.path.isdir(os.path.join(out, d)))
    state = train.read_train_state(checkpoint)  # the optimizer's state was on the GPU
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert moments and all(t.device.type == "cpu" for t in moments)
    on_cpu = registry.load_model(summary["model"], reg, device="cpu").model
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = on_cpu(x)[0]
        assert (copy.deepcopy(on_cpu).cuda()(x.cuda())[0].cpu() - expected).abs().max() < 1e-3


def test_the_gpu_resize_branch_matches_the_cpu_path_within_one_level(ray_local, tmp_path) -> None:
    uris = []
    for i, (w, h) in enumerate(SIZES):
        uris.append(str(tmp_path / f"ISIC_000000{i}.jpg"))
        storage.write_bytes(uris[-1], jpeg(w, h, i))
    rows = {device: {r["id"]: r for r in preprocess.image_dataset(uris, size=48, device=device).take_all()}
            for device in ("cpu", "cuda")}
    assert rows["cpu"].keys() == rows["cuda"].keys() and len(rows["cpu"]) == len(SIZES)
    for image_id, row in rows["cpu"].items():
        on_gpu = rows["cuda"][image_id]
        assert row["error"] == on_gpu["error"] == "" and on_gpu["image"].dtype == np.uint8
        assert np.abs(on_gpu["image"].astype(int) - row["image"].astype(int)).max() <= 1
