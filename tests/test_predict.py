"""kind: predict on real Ray and a real S3 endpoint: ISIC masks at original sizes and names, bad inputs
as error rows, resume after an interruption, Task 2 with flips and overlays."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lesion_ray import cli, data, feed, inference, manifest, postprocess, predict, preprocess, registry, storage
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.preprocess import decode_image, to_model_input
from lesion_ray.spec import CheckContext, SpecError, from_dict

SIZES = [(40, 30), (57, 33), (31, 48), (64, 64), (90, 61), (45, 45)]  # (width, height)


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def publish_tiny_model(tmp_path, registry_uri: str, task: int, speckled_on: list[bytes] | None = None) -> str:
    """An untrained model; ``speckled_on``: images on which its logits are rescaled to spread widely around 0,
    so that its masks at threshold 0.5 are speckled (an untrained model's probabilities barely vary)."""
    config = ModelConfig(task=task, input_size=32, num_filters=4, depth=2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    if speckled_on:
        pixels = to_model_input([decode_image(image, target=32)[0] for image in speckled_on], 32)
        x = torch.from_numpy(pixels).float() / 255
        with torch.no_grad():
            logits = model(x)[0]
            scale = 3 / logits.std()
            model.final.weight.mul_(scale)
            model.final.bias.sub_(logits.median()).mul_(scale)
    model_dir = str(tmp_path / f"model{task}")
    registry.save_model_dir(model_dir, registry.plain_state_dict(model), registry.config_to_json(config, threshold=0.5))
    return registry.publish(model_dir, f"tiny{task}", {}, registry_uri)


def make_spec(**keys) -> predict.PredictSpec:
    """A predict spec with one inference actor unless ``keys`` name them (on 2 cores a second one costs each short
    job seconds of start)."""
    actors = {} if {"min_actors", "max_actors"} & keys.keys() else {"min_actors": 1, "max_actors": 1}
    return unplaced_spec(**actors, **keys)


def unplaced_spec(**keys) -> predict.PredictSpec:
    """A predict spec that leaves the actor layout to the job."""
    return from_dict(predict.PredictSpec, {"kind": "predict", "name": "predict", **keys}, "test")


def read_png(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    image.load()
    return image


def test_to_masks_resizes_probabilities_then_thresholds() -> None:
    probs = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float16)
    # Bilinear 2 -> 4 columns samples at x = -0.25, 0.25, 0.75, 1.25: 0, .25, .75, 1.
    assert postprocess.to_masks(probs, 3, 4, 0.5)[0].tolist() == [[False, False, True, True]] * 3
    assert postprocess.to_masks(probs, 3, 4, 0.2)[0].tolist() == [[False, True, True, True]] * 3


def test_runner_precisions_and_memory_format_agree_with_fp32() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(task=2, input_size=32, num_filters=4, depth=2))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    fp32 = inference.Runner(copy.deepcopy(model), "cpu", inference.ModelRuntime(), 32, 4)
    reference = fp32(images)
    assert [tuple(o.shape) for o in reference] == [(3, 5, 32, 32), (3, 5), (3, 5)]
    assert all(torch.equal(a, b) for a, b in zip(fp32(images.float() / 255), reference, strict=True))
    for runtime, tolerance in ((inference.ModelRuntime(precision="bf16"), 0.05),
                               (inference.ModelRuntime(precision="fp16"), 0.01),
                               (inference.ModelRuntime(channels_last=True), 1e-5)):
        outputs = inference.Runner(copy.deepcopy(model), "cpu", runtime, 32, 4)(images)
        for out, ref in zip(outputs, reference, strict=True):
            assert out.dtype == torch.float32 and (out - ref).abs().max() < tolerance
        if runtime.precision != "fp32":  # autocast did run at the lower precision
            assert (outputs[0] - reference[0]).abs().max() > 0


def test_a_model_that_cannot_compile_runs_uncompiled_with_a_warning(capfd) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(task=1, input_size=32, num_filters=4, depth=2))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    eager = inference.Runner(copy.deepcopy(model), "cpu", inference.ModelRuntime(), 32, 4)(images)
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, "/bin/false")}):  # a machine without a C++ compiler
            runner = inference.Runner(model, "cpu", inference.ModelRuntime(compile=True), 32, 4)
    finally:
        torch._dynamo.reset()
    assert not runner.compiled and "C++ compiler" in runner.compile_error
    assert "torch.compile failed, the model runs uncompiled" in capfd.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(runner(images), eager, strict=True))


def test_tint_blends_only_the_masked_pixels_in_the_overlay_colour() -> None:
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[[True, False, False], [False, False, True]]])
    out = postprocess.tint(image, mask)
    alpha, colour = postprocess.OVERLAY_ALPHA, np.array(postprocess.OVERLAY_COLOURS[1][0])
    assert out.dtype == np.uint8 and (out[~mask[0]] == 100).all()
    assert (out[mask[0]] == np.round((1 - alpha) * 100 + alpha * colour)).all()


def regions(mask: np.ndarray, diagonal: bool) -> list[set[tuple[int, int]]]:
    """The connected regions of True pixels, by breadth-first search (independent of predict's run labelling)."""
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx) and (diagonal or not (dy and dx))]
    todo, found = {tuple(p) for p in np.argwhere(mask)}, []
    while todo:
        region, frontier = set(), [todo.pop()]
        while frontier:
            y, x = frontier.pop()
            region.add((y, x))
            for dy, dx in steps:
                if (y + dy, x + dx) in todo:
                    todo.remove((y + dy, x + dx))
                    frontier.append((y + dy, x + dx))
        found.append(region)
    return found


def holes(mask: np.ndarray) -> int:
    """Background regions (4-connected) that do not reach the border."""
    h, w = mask.shape
    return sum(all(0 < y < h - 1 and 0 < x < w - 1 for y, x in r) for r in regions(~mask, diagonal=False))


def test_largest_component_drops_stray_blobs_and_fills_holes() -> None:
    probs = np.zeros((1, 16, 16), np.float32)
    probs[0, 3:12, 3:12] = 0.9  # the lesion
    probs[0, 6:8, 6:8] = 0.1    # a hole in it
    probs[0, 13:15, 13:15] = 0.8  # a stray blob
    probs[0, 0, 0] = 0.7  # and a stray pixel in the corner
    raw = postprocess.to_masks(probs, 32, 32, 0.5)[0]
    assert len(regions(raw, diagonal=True)) == 3 and holes(raw) == 1
    kept = postprocess.to_masks(probs, 32, 32, 0.5, "largest_component")[0]
    assert len(regions(kept, diagonal=True)) == 1 and holes(kept) == 0
    assert kept[6:24, 6:24].all() and kept.sum() == 18 * 18  # the lesion, filled, and nothing else
    # Task 2 attribute masks are many regions by nature: left as they are.
    attributes = np.repeat(probs, 5, axis=0)
    assert np.array_equal(postprocess.to_masks(attributes, 32, 32, 0.5, "largest_component"),
                          postprocess.to_masks(attributes, 32, 32, 0.5))
    assert not postprocess.largest_component(np.zeros((4, 4), bool)).any()
    assert postprocess.largest_component(np.ones((4, 4), bool)).all()


def test_min_actors_above_max_and_max_pixels_beyond_pillow_are_spec_errors() -> None:
    with pytest.raises(SpecError, match="min_actors: must be at most max_actors"):
        make_spec(input="x", model="m@latest", output="y", min_actors=3, max_actors=2)
    # Pillow refuses to open images beyond 2 x its MAX_IMAGE_PIXELS, whatever max_pixels says.
    with pytest.raises(SpecError, match="max_pixels: must be at most 178956970, got 300000000"):
        make_spec(input="x", model="m@latest", output="y", max_pixels=300_000_000)


def test_ray_workers_get_the_jobs_storage_settings(ray_local, settings) -> None:
    # Installed by the runtime_env's setup hook when each worker starts, not read from the environment.
    @ray_local.remote
    def installed() -> storage.S3Config | None:
        return storage._config

    assert ray_local.get(installed.remote()) == settings.storage


def test_model_is_checked_in_the_specs_own_registry(tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1)
    # The output lies beside the input (inside it, the spec would be refused).
    keys = {"input": str(tmp_path), "model": ref, "output": f"{tmp_path}-out"}
    make_spec(**keys, registry=str(tmp_path / "registry")).check(CheckContext(source="test"))
    with pytest.raises(SpecError, match="model: model tiny1@1 is not in the registry .*elsewhere"):
        make_spec(**keys, registry=str(tmp_path / "elsewhere")).check(CheckContext(source="test"))


def test_s3_to_s3_with_bad_inputs_then_resume(ray_local, settings, s3_bucket, tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, f"{s3_bucket}/registry", task=1)
    inputs = f"{s3_bucket}/in"  # a plain folder of images
    for i, (w, h) in enumerate(SIZES):
        storage.write_bytes(f"{inputs}/ISIC_000000{i}.jpg", jpeg(w, h, i))
    good = jpeg(50, 40, 99)
    storage.write_bytes(f"{inputs}/ISIC_0000097.jpg", b"this is not a jpeg")
    storage.write_bytes(f"{inputs}/ISIC_0000098.jpg", good[: len(good) // 2])  # truncated
    storage.write_bytes(f"{inputs}/ISIC_0000099.jpg", b"")
    storage.write_text(f"{inputs}/LICENSE.txt", "not an input")
    out = f"{s3_bucket}/out"
    spec = make_spec(input=inputs, model=ref, registry=f"{s3_bucket}/registry", output=out, batch_size=4,
                     max_actors=2, overlays="sample", overlay_sample=2)

    summary = predict.run(spec, settings)
    assert (summary["inputs"], summary["ok"], summary["error"], summary["resumed"]) == (9, 6, 3, 0)
    assert summary["model"] == "tiny1@1" and summary["threshold"] == 0.5
    for i, (w, h) in enumerate(SIZES):
        mask = read_png(f"{out}/masks/ISIC_000000{i}_segmentation.png")
        assert mask.mode == "L" and mask.size == (w, h)
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert storage.exists(f"{out}/overlays/ISIC_0000000_overlay.png")
    assert read_png(f"{out}/overlays/ISIC_0000001_overlay.png").size == (3 * 57, 33)
    assert not storage.exists(f"{out}/overlays/ISIC_0000002_overlay.png")

    first = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{manifest.MANIFEST_FILE}"))).to_pylist()
    rows = {r["id"]: r for r in first}
    assert len(first) == 9
    assert {k for k, r in rows.items() if r["status"] == "error"} == {"ISIC_0000097", "ISIC_0000098", "ISIC_0000099"}
    assert rows["ISIC_0000097"]["error"] == "not an image"
    assert "truncated" in rows["ISIC_0000098"]["error"] and "empty" in rows["ISIC_0000099"]["error"]
    ok = rows["ISIC_0000003"]
    assert ok["masks"] == [f"{out}/masks/ISIC_0000003_segmentation.png"]
    assert (ok["width"], ok["height"]) == (64, 64) and ok["model_version"] == "1"
    assert len(ok["head1_prob"]) == len(ok["head2_prob"]) == len(ok["area_fraction"]) == 1
    mask = np.asarray(read_png(ok["masks"][0]))
    assert ok["area_fraction"][0] == pytest.approx(np.count_nonzero(mask) / mask.size)

    # An interruption: only the rows of four images reached a manifest part, no final manifest,
    # and one of those four lost its mask.
    done = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    part = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{manifest.MANIFEST_FILE}")))
    with storage.open_write(f"{out}/{manifest.PARTS_DIR}/part-0.parquet") as f:
        pq.write_table(part.filter(np.isin(part["id"].to_numpy(zero_copy_only=False), done)), f)
    storage.delete(f"{out}/{manifest.MANIFEST_FILE}")
    storage.delete(f"{out}/masks/ISIC_0000002_segmentation.png")

    again = predict.run(spec, settings)
    assert (again["inputs"], again["ok"], again["error"], again["resumed"]) == (9, 6, 3, 3)
    second = {r["id"]: r for r in pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{manifest.MANIFEST_FILE}")))
              .to_pylist()}
    for image_id in ("ISIC_0000000", "ISIC_0000001", "ISIC_0000003"):  # kept, not written again
        assert second[image_id]["finished_at"] == rows[image_id]["finished_at"]
    for image_id in ("ISIC_0000002", "ISIC_0000004", "ISIC_0000097"):  # done again
        assert second[image_id]["finished_at"] > rows[image_id]["finished_at"]
    assert storage.exists(f"{out}/masks/ISIC_0000002_segmentation.png")
    assert not storage.exists(f"{out}/{manifest.PARTS_DIR}")


def test_task2_local_with_flips_and_all_overlays(ray_local, settings, tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=2)
    inputs = tmp_path / "isic" / "ISIC2018_Task1-2_Validation_Input"
    for i, (w, h) in enumerate(SIZES[:3]):
        storage.write_bytes(str(inputs / f"ISIC_000000{i}.jpg"), jpeg(w, h, i))
    out = tmp_path / "out"
    # The spec names no registry: the job's settings do (a cluster config's registry).
    summary = predict.run(make_spec(input=str(tmp_path / "isic"), model=ref, output=str(out), tta=True, overlays="all",
                                    threshold=0.3), dataclasses.replace(settings, registry=str(tmp_path / "registry")))
    assert (summary["inputs"], summary["ok"], summary["error"], summary["threshold"]) == (3, 3, 0, 0.3)
    for i, (w, h) in enumerate(SIZES[:3]):
        for name in data.ATTRIBUTES:
            with Image.open(out / "masks" / f"ISIC_000000{i}_attribute_{name}.png") as mask:
                assert mask.mode == "L" and mask.size == (w, h)
        assert (out / "overlays" / f"ISIC_000000{i}_overlay.png").exists()
    row = pq.read_table(out / manifest.MANIFEST_FILE).to_pylist()[0]
    assert len(row["masks"]) == len(row["head1_prob"]) == len(row["head2_prob"]) == 5
    assert all(0.0 <= p <= 1.0 for p in row["head1_prob"] + row["head2_prob"])


def test_task1_masks_are_one_region_without_holes(ray_local, settings, tmp_path) -> None:
    images = [jpeg(w, h, i) for i, (w, h) in enumerate(SIZES[3:])]
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1, speckled_on=images)
    inputs = tmp_path / "isic" / "ISIC2018_Task1-2_Validation_Input"
    for i, image in enumerate(images):
        storage.write_bytes(str(inputs / f"ISIC_000000{i}.jpg"), image)
    keys = {"input": str(tmp_path / "isic"), "model": ref, "registry": str(tmp_path / "registry"), "overlays": "none"}
    predict.run(make_spec(**keys, output=str(tmp_path / "raw"), postprocess="none"), settings)
    predict.run(make_spec(**keys, output=str(tmp_path / "out")), settings)
    for i in range(len(SIZES[3:])):
        name = f"masks/ISIC_000000{i}_segmentation.png"
        raw = np.asarray(Image.open(tmp_path / "raw" / name)) > 0
        assert len(regions(raw, diagonal=True)) > 5 and holes(raw) > 0
        mask = np.asarray(Image.open(tmp_path / "out" / name)) > 0
        assert len(regions(mask, diagonal=True)) == 1 and holes(mask) == 0


def test_decoding_in_the_actors_gives_the_same_masks_and_bf16_close_probabilities(ray_local, settings,
                                                                                   tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1)
    inputs = tmp_path / "in"
    for i, (w, h) in enumerate(SIZES[:4]):
        storage.write_bytes(str(inputs / f"ISIC_000000{i}.jpg"), jpeg(w, h, i))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    Image.open(io.BytesIO(jpeg(40, 30, 7))).save(rotated, "JPEG", exif=exif)
    storage.write_bytes(str(inputs / "ISIC_0000007.jpg"), rotated.getvalue())
    Image.open(io.BytesIO(jpeg(30, 20, 8))).save(inputs / "ISIC_0000008.png")
    storage.write_bytes(str(inputs / "ISIC_0000009.jpg"), jpeg(50, 40, 9)[:300])  # truncated
    keys = {"input": str(inputs), "model": ref, "registry": str(tmp_path / "registry"), "overlays": "none",
            "batch_size": 4}
    runs = {name: predict.run(make_spec(**keys, **extra, output=str(tmp_path / name)), settings)
            for name, extra in (("tasks", {}), ("actors", {"decode": "gpu"}), ("bf16", {"precision": "bf16"}))}
    assert all((r["ok"], r["error"]) == (6, 1) for r in runs.values())
    rows = {name: {r["id"]: r for r in pq.read_table(tmp_path / name / manifest.MANIFEST_FILE).to_pylist()}
            for name in runs}
    assert "truncated" in rows["actors"]["ISIC_0000009"]["error"] and rows["actors"]["ISIC_0000009"]["height"] == 0
    assert (rows["actors"]["ISIC_0000007"]["width"], rows["actors"]["ISIC_0000007"]["height"]) == (30, 40)
    for image_id, row in rows["tasks"].items():
        if row["status"] == "ok":
            masks = [np.asarray(read_png(str(tmp_path / run / f"masks/{image_id}_segmentation.png")))
                     for run in ("tasks", "actors")]
            assert np.array_equal(*masks)
            assert rows["actors"][image_id]["head1_prob"] == row["head1_prob"]
            assert rows["bf16"][image_id]["head1_prob"] == pytest.approx(row["head1_prob"], abs=0.02)
    assert any(rows["bf16"][i]["head1_prob"] != r["head1_prob"] for i, r in rows["tasks"].items() if r["head1_prob"])


def test_the_actor_layout_follows_the_clusters_gpus_cores_and_cpus() -> None:
    spec = unplaced_spec(input="in", model="m@1", output="out")
    several_nodes = predict.actor_layout(spec, 0, None, 16)
    assert (several_nodes.gpus_per_actor, several_nodes.min_actors, several_nodes.max_actors) == (0.0, 1, 1)
    one_node = predict.actor_layout(spec, 0, 6, 8)
    assert (one_node.gpus_per_actor, one_node.min_actors, one_node.max_actors) == (0.0, 6, 6)  # one per core
    # 8 cores under the embedded Ray's 8 CPUs: one CPU stays for a decoding and a writing task.
    eight_cores = predict.actor_layout(spec, 0, 8, 8)
    assert (eight_cores.min_actors, eight_cores.max_actors) == (7, 7)
    assert predict.actor_layout(spec, 0, 64, 64).max_actors == predict.MAX_CPU_ACTORS
    assert predict.actor_layout(spec, 0, 2, 1).max_actors == 1
    two_cores_each = predict.actor_layout(unplaced_spec(input="in", model="m@1", output="out", cpus_per_actor=2), 0, 6,
                                          8)
    assert (two_cores_each.min_actors, two_cores_each.max_actors) == (3, 3)
    on_cpus = predict.actor_layout(unplaced_spec(input="in", model="m@1", output="out", gpus_per_actor=0.0), 2, 4, 8)
    assert (on_cpus.gpus_per_actor, on_cpus.min_actors, on_cpus.max_actors) == (0.0, 4, 4)
    on_gpus = predict.actor_layout(spec, 2, 16, 16)
    assert (on_gpus.gpus_per_actor, on_gpus.min_actors, on_gpus.max_actors) == (0.5, 4, 4)
    assert predict.describe_layout(one_node) == "inference: 6 actor(s) x 1 CPU, fp32"
    assert predict.describe_layout(on_gpus) == "inference: 4 actor(s) x 0.5 GPU, fp32"
    named = predict.actor_layout(unplaced_spec(input="in", model="m@1", output="out", max_actors=3), 2, 16, 16)
    assert (named.gpus_per_actor, named.min_actors, named.max_actors) == (0.5, 3, 3)
    with pytest.raises(ValueError, match="gpus_per_actor is 1.0 but the Ray cluster has 0 GPUs"):
        predict.actor_layout(unplaced_spec(input="in", model="m@1", output="out", gpus_per_actor=1.0), 0, 2, 8)


def test_cpu_stages_run_one_task_per_core_not_per_logical_cpu(ray_local, monkeypatch) -> None:
    # The session's Ray is one node with 8 logical CPUs; on a machine with 3 cores a stage runs 3 tasks at once.
    assert ray_local.cluster_resources()["CPU"] == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert preprocess.task_pool().size == preprocess.one_node_cores() == 3


def test_every_listed_object_is_accounted_for(ray_local, settings, s3_bucket, tmp_path) -> None:
    ref = publish_tiny_model(tmp_path, f"{s3_bucket}/registry", task=1)
    inputs, out = f"{s3_bucket}/in", f"{s3_bucket}/out"
    for i in range(4):
        storage.write_bytes(f"{inputs}/ISIC_000000{i}.jpg", jpeg(40, 30, i))
    objects = {
        "ISIC_0000001.png": jpeg(40, 30, 11),  # a second file with the id of ISIC_0000001.jpg
        "sub/ISIC_0000002.jpg": jpeg(40, 30, 12),  # the same id in a sub-folder
        "ISIC_0000004.tif": b"II*\x00", "scan.bmp": b"BM",  # images of types lesion-ray does not read
        "ISIC_0000005.jpg": jpeg(300, 300, 5),  # over max_bytes
        "LICENSE.txt": b"CC-BY-NC", "metadata.csv": b"id,age\n",  # not images
        "ISIC_0000000_segmentation.png": jpeg(40, 30, 0),  # a mask, not an input
    }
    for name, body in objects.items():
        storage.write_bytes(f"{inputs}/{name}", body)
    assert len(objects["ISIC_0000005.jpg"]) > 20_000 > len(jpeg(40, 30, 0))

    summary = predict.run(make_spec(input=inputs, model=ref, registry=f"{s3_bucket}/registry", output=out,
                                    batch_size=2, overlays="none", max_bytes=20_000), settings)
    assert (summary["listed"], summary["ok"], summary["error"], summary["skipped"]) == (12, 4, 5, 3)
    rows = {r["source"].removeprefix(f"{inputs}/"): r for r in manifest.read(out).to_pylist()}
    assert sorted(r for r, row in rows.items() if row["status"] == "ok") == [f"ISIC_000000{i}.jpg" for i in range(4)]
    assert rows["ISIC_0000001.png"]["error"] == f"duplicate id ISIC_0000001: also {inputs}/ISIC_0000001.jpg"
    assert rows["sub/ISIC_0000002.jpg"]["error"] == f"duplicate id ISIC_0000002: also {inputs}/ISIC_0000002.jpg"
    assert rows["ISIC_0000004.tif"]["error"] == "unsupported image type .tif: convert it to JPEG or PNG"
    assert rows["scan.bmp"]["error"].startswith("unsupported image type .bmp")
    assert "over max_bytes (20,000): not read" in rows["ISIC_0000005.jpg"]["error"]
    skipped = storage.read_text(f"{out}/{manifest.SKIPPED_FILE}").splitlines()
    assert skipped[0] == "source,reason" and sorted(skipped[1:]) == [
        f'{inputs}/ISIC_0000000_segmentation.png,"a mask, not an input image"',
        f"{inputs}/LICENSE.txt,not an image file", f"{inputs}/metadata.csv,not an image file"]
    assert not storage.exists(f"{out}/masks/ISIC_0000005_segmentation.png")


def test_a_listing_longer_than_a_pass_goes_on_in_further_passes(ray_local, settings, tmp_path, monkeypatch,
                                                                capsys) -> None:
    # Scaled down: listing pages of 4 images, passes of 2 pages (2 read tasks of one page), instead of 1,000 and
    # 2,080 (about 2 M images). 20 images: 3 passes, with nothing lost and no rerun between them.
    monkeypatch.setattr(storage, "_PAGE", 4)
    monkeypatch.setattr(feed, "READ_TASKS", 2)
    monkeypatch.setattr(feed, "PAGES_PER_READ", 1)
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1)
    inputs, out = tmp_path / "in", str(tmp_path / "out")
    ids = [f"ISIC_{i:07d}" for i in range(20)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(str(inputs / f"{image_id}.jpg"), jpeg(32, 24, i))
    summary = predict.run(make_spec(input=str(inputs), model=ref, registry=str(tmp_path / "registry"), output=out,
                                    batch_size=4, overlays="none"), settings)
    assert (summary["listed"], summary["ok"], summary["error"]) == (20, 20, 0), summary
    assert sorted(row["id"] for row in manifest.read(out).to_pylist() if row["status"] == "ok") == ids
    assert "the pipeline failed" not in capsys.readouterr().err


def test_shards_split_an_archive_and_the_manifests_merge(ray_local, settings, tmp_path, capsys) -> None:
    ref = publish_tiny_model(tmp_path, str(tmp_path / "registry"), task=1)
    inputs = tmp_path / "in"
    ids = [f"ISIC_{i:07d}" for i in range(16)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(str(inputs / f"{image_id}.jpg"), jpeg(32, 24, i))
    storage.write_text(str(inputs / "README.txt"), "not an image")
    outputs = [str(tmp_path / f"out{k}") for k in (1, 2)]
    shards = [predict.run(make_spec(input=str(inputs), model=ref, registry=str(tmp_path / "registry"), output=out,
                                    overlays="none", shard=f"{k}/2"), settings) for k, out in zip((1, 2), outputs,
                                                                                                  strict=True)]
    mine = [{r["id"] for r in manifest.read(out).to_pylist()} for out in outputs]
    assert mine[0] and mine[1] and not mine[0] & mine[1] and mine[0] | mine[1] == set(ids)
    for summary, rows in zip(shards, mine, strict=True):
        assert summary["listed"] == 17 and summary["other_shards"] == 17 - summary["inputs"] - summary["skipped"]
        assert summary["inputs"] == len(rows)
    assert shards[0]["skipped"] + shards[1]["skipped"] == 1  # README.txt, in the shard its name hashes to

    merged = str(tmp_path / "all")
    assert cli.main(["manifest", *outputs, "--to", merged]) == 0
    assert re.search(r"listed +: 17\n", capsys.readouterr().out)
    assert sorted(r["id"] for r in manifest.read(merged).to_pylist()) == ids
    assert cli.main(["manifest", outputs[0], outputs[0], "--to", merged]) == 1
    assert "two jobs ran the same shard" in capsys.readouterr().err
    with pytest.raises(SpecError, match=r"shard: K must be at most N in K/N, got 3/2"):
        make_spec(input=str(inputs), model=ref, output=outputs[0], shard="3/2")
