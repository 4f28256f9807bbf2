"""Decoding every kind of input a user may hand us, and the streaming Ray Data pipeline."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lesion_ray import data, inference, preprocess, spec, storage, synth


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes of greyscale PNG that inflate to ``width`` x ``height`` pixels of zeros."""
    rows = zlib.compress(b"\x00" * (width + 1) * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


BOMB = _png_bomb(9000, 9000)  # 81 megapixels > DEFAULT_MAX_PIXELS, about 80 KB of file
RED = Image.new("RGB", (60, 40), (255, 0, 0))
JPEG = _encode(RED, "JPEG", quality=95)
NOISE = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), np.uint8)), "JPEG")


def _oriented_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    return _encode(RED, "JPEG", exif=exif)


# name -> (bytes, expected error fragment or None when it must decode)
INPUTS = {
    "ok.jpg": (JPEG, None),
    "png_named_jpeg.jpg": (_encode(RED, "PNG"), None),
    "cmyk.jpg": (_encode(Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG"), None),
    "grey16.png": (_encode(Image.fromarray(np.full((40, 60), 32768, np.uint16)), "PNG"), None),
    "rgba.png": (_encode(Image.new("RGBA", (60, 40), (255, 0, 0, 128)), "PNG"), None),
    "grey.jpg": (_encode(Image.new("L", (60, 40), 128), "JPEG"), None),
    "palette.png": (_encode(RED.convert("P"), "PNG"), None),
    "rotated.jpg": (_oriented_jpeg(), None),
    "empty.jpg": (b"", "empty file"),
    "truncated.jpg": (NOISE[: len(NOISE) * 2 // 3], "truncated JPEG data"),
    "truncated_header.jpg": (JPEG[:300], "truncated"),
    "cut.png": (_encode(Image.fromarray(np.zeros((150, 200, 3), np.uint8)), "PNG", compress_level=0)[:2000],
                      "truncated PNG"),
    "text.jpg": (b"this is not an image\n" * 10, "not an image"),
    "bomb.png": (BOMB, "decompression bomb"),
}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_decode_image_accepts_every_valid_format_and_names_what_is_wrong(name: str) -> None:
    payload, error = INPUTS[name]
    if error:
        with pytest.raises(preprocess.BadImage, match=error):
            preprocess.decode_image(payload)
        return
    pixels, (height, width) = preprocess.decode_image(payload)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[:2] == (height, width) == ((60, 40) if name == "rotated.jpg" else (40, 60))
    if name == "grey16.png":
        assert abs(int(pixels.mean()) - 127) <= 1  # 16-bit scaled to 8 bits, not clipped to 255
    elif name in ("grey.jpg",):
        assert (pixels[..., 0] == pixels[..., 2]).all()
    else:
        assert pixels[..., 0].mean() > 200 and pixels[..., 1:].mean() < 60  # still red after conversion


def test_decode_image_draft_mode_and_pixel_limit() -> None:
    big = _encode(Image.new("RGB", (1024, 768), (10, 200, 30)), "JPEG")
    pixels, orig = preprocess.decode_image(big, target=256)
    assert orig == (768, 1024)
    assert pixels.shape == (384, 512, 3)  # decoded at 1/2 scale: the smallest that covers 256x256
    assert preprocess.decode_image(big)[0].shape == (768, 1024, 3)
    with pytest.raises(preprocess.BadImage, match="max_pixels=100,000"):
        preprocess.decode_image(big, max_pixels=100_000)


def test_to_model_input_resizes_to_uint8() -> None:
    images = [np.full((40, 60, 3), 255, np.uint8), np.zeros((7, 5, 3), np.uint8), np.full((16, 16, 3), 51, np.uint8)]
    batch = preprocess.to_model_input(images, 16)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.uint8
    assert (batch[0] == 255).all() and (batch[1] == 0).all() and (batch[2] == 51).all()


def test_the_decoding_tasks_resize_matches_torchs_within_one_level() -> None:
    # Decoding tasks resize with PIL; GPU actors (training, decode: gpu) in float32, rounded; Serve's model replica
    # in uint8 on its CPU: all three must agree within 1/255.
    pixels = np.random.default_rng(0).integers(0, 256, (77, 103, 3), dtype=np.uint8)
    ours = preprocess.to_model_input([pixels], 32)[0].astype(int)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    as_float = F.interpolate(image[None].float(), size=(32, 32), mode="bilinear", antialias=True,
                             align_corners=False)[0].round().clamp(0, 255)
    on_cpu = inference.resize(image, 32)
    assert on_cpu.dtype == torch.uint8
    assert np.abs(ours - as_float.int().numpy()).max() <= 1
    assert np.abs(ours - on_cpu.int().numpy()).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_ops_match_pil(orientation) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_encode(im, "PNG", exif=exif)))))
    chw = torch.from_numpy(stored).permute(2, 0, 1)
    ours = inference._ORIENT[orientation](chw) if orientation in inference._ORIENT else chw
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), upright)


def test_model_inputs_decode_in_the_actor_with_an_error_per_bad_input(tmp_path) -> None:
    # decode: gpu on a machine without one (or without torchvision): every image takes the CPU path, each
    # bad one becomes its own error and the good ones match the decode tasks' rows exactly.
    good = [payload for payload, error in INPUTS.values() if not error]
    bad = {name: (payload, error) for name, (payload, error) in INPUTS.items() if error}
    inputs = inference.ModelInputs("cpu", 32, preprocess.DEFAULT_MAX_PIXELS)
    images, sizes, errors = inputs(good + [payload for payload, _ in bad.values()])
    assert images.dtype == torch.uint8 and images.shape == (len(good) + len(bad), 3, 32, 32)
    assert errors[: len(good)] == [""] * len(good) and inputs.on_cpu == len(good) and inputs.on_gpu == 0
    for error, (_, expected) in zip(errors[len(good):], bad.values(), strict=True):
        assert expected in error
    for i, payload in enumerate(good):
        pixels, orig = preprocess.decode_image(payload, target=32)
        assert sizes[i] == orig and np.array_equal(images[i].numpy(), preprocess.to_model_input([pixels], 32)[0])
    assert (images[len(good):] == 0).all() and sizes[len(good):] == [(0, 0)] * len(bad)


def test_image_dataset_one_row_per_input_with_errors(ray_local, tmp_path) -> None:
    sources = []
    for name, (payload, _) in INPUTS.items():
        storage.write_bytes(str(tmp_path / name), payload)
        sources.append(str(tmp_path / name))
    sources.append(str(tmp_path / "missing.jpg"))
    rows = {r["id"]: r for r in preprocess.image_dataset(sources, size=32, batch_size=8).take_all()}
    assert len(rows) == len(sources)
    for name, (_, error) in INPUTS.items():
        row = rows[name.rsplit(".", 1)[0]]
        assert row["source"] == str(tmp_path / name) and row["image"].shape == (3, 32, 32)
        if error:
            assert error in row["error"] and row["orig_height"] == 0
        else:
            assert row["error"] == "" and row["image"].dtype == np.uint8
    assert "no such file" in rows["missing"]["error"]
    assert rows["ok"]["image"][0].mean() > 230 and rows["ok"]["image"][1].mean() < 25
    assert (rows["rotated"]["orig_height"], rows["rotated"]["orig_width"]) == (60, 40)


@pytest.fixture(scope="module")
def isic_s3(ray_local, settings, s3_endpoint) -> str:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="preprocess-isic")
    raw = {
        "kind": "synth",
        "name": "s",
        "output": "s3://preprocess-isic/isic",
        "num_images": 6,
        "validation_images": 0,
        "width": [64, 96],
        "seed": 3,
    }
    synth.run(spec.from_dict(synth.SynthSpec, raw, "test"), settings)
    return raw["output"]


@pytest.mark.parametrize("task", [1, 2])
def test_image_dataset_training_rows_from_s3(isic_s3: str, task: int) -> None:
    samples = data.discover(isic_s3, task=task).samples
    rows = preprocess.image_dataset(samples, size=24, task=task).take_all()
    channels = 1 if task == 1 else len(data.ATTRIBUTES)
    assert sorted(r["id"] for r in rows) == [s.id for s in samples]
    for row in rows:
        assert row["error"] == "" and 64 <= row["orig_width"] <= 96
        assert row["mask"].shape == (channels, 24, 24) and set(np.unique(row["mask"])) <= {0.0, 1.0}
        visible = row["mask"].reshape(channels, -1).max(1) > 0  # a tiny structure may vanish at 24x24
        assert (row["present"][visible] == 1).all()
    if task == 1:
        assert all(r["present"][0] == 1 for r in rows)  # every image has a lesion


def test_image_dataset_reports_mask_of_wrong_size(isic_s3: str) -> None:
    sample = data.discover(isic_s3, task=1).samples[0]
    wrong = f"{isic_s3}/elsewhere/{sample.id}_segmentation.png"
    storage.write_bytes(wrong, _encode(Image.new("L", (10, 10), 255), "PNG"))
    bad = data.Sample(sample.id, sample.image, segmentation=wrong)
    missing = data.Sample("ISIC_9999999", sample.image)
    rows = {r["id"]: r for r in preprocess.image_dataset([bad, missing], size=16, task=1).take_all()}
    assert "is 10x10 but its image is" in rows[sample.id]["error"]
    assert "no Task 1 ground truth" in rows["ISIC_9999999"]["error"]


def test_the_cpu_tasks_modules_never_import_torch() -> None:
    # Every process that runs a reading, decoding, writing or scoring task would pay seconds of CPU and ~250 MB for it.
    modules = ["feed", "preprocess", "outputs", "postprocess", "evaluate", "synth", "manifest", "storage"]
    code = (f"import sys, {', '.join('lesion_ray.' + m for m in modules)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
