"""Image preprocessing as streaming Ray Data operators: read, decode, resize to the model's input as uint8.

``image_dataset`` builds two operators over a dataset of source rows (id, URI, mask URIs):

1. decode (CPU tasks): bytes through :mod:`lesion_ray.storage`, PIL decode in JPEG draft mode when
   the model input is small, EXIF orientation, RGB conversion (greyscale, palette, RGBA, CMYK,
   16-bit), a decompression-bomb limit, masks resized with nearest neighbour and binarised;
2. resize with torch (:func:`to_model_input`) on GPU actors when the cluster has GPUs, otherwise in the
   same CPU task, straight after the decode. Rows stay uint8 [3, S, S]: the model's side scales them.

For ``decode: gpu`` (:func:`fetched`, :class:`ModelInputs`) read tasks only move bytes and the inference
actors decode JPEGs with nvJPEG on their GPU (torchvision, not a dependency: a GPU image has it).
A batch's objects are read by a few threads at once (an S3 read is mostly network wait).

Every input yields exactly one row; anything wrong with an item becomes that row's ``error``
text, never an exception, so a job can account for every input. Rows stream through the
pipeline: memory does not grow with the number of images.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from lesion_ray import storage
from lesion_ray.data import ATTRIBUTES, Sample, sample_id

# 5x the largest ISIC 2018 image (4,288 x 2,848); a larger header is a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000
_MAX_BLOCKS = 1000
# Logical share of a GPU per resize actor: resizing is light, and model actors or Ray Train
# workers that follow in the same job must still find their GPU free.
_GPU_SHARE = 0.25
_READ_THREADS = 8


class BadImage(ValueError):
    """Bytes that cannot become an image; ``reason`` is a short text for the error record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in ``data``, header read but pixels not yet decoded; :class:`BadImage` when it is not
    an image or its header promises more than ``max_pixels`` (a decompression bomb)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(exc, "image header") from None
    width, height = im.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} pixels is more than max_pixels={max_pixels:,}")
    return im


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(exc, f"{im.format or 'image'} data") from None


def _broken(exc: Exception, what: str) -> BadImage:
    truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
    return BadImage(f"{'truncated' if truncated else 'corrupt'} {what}: {exc}")


def _as_uint8(im: Image.Image, mode: str) -> np.ndarray:
    """Pixels as uint8 in ``mode`` ("RGB" or "L"); 16/32-bit greyscale is scaled, not clipped."""
    if im.mode.startswith("I"):
        grey = (np.asarray(im).astype(np.int64).clip(0, 65535) // 257).astype(np.uint8)
        im = Image.fromarray(grey, "L")
    if im.mode != mode:
        try:
            im = im.convert(mode)
        except ValueError:
            raise BadImage(f"unsupported pixel mode {im.mode}") from None
    return np.asarray(im)


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag (1: as stored)."""
    try:
        # Reading EXIF can mean reading the file (PNG keeps it in chunks after the pixel data).
        return im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(exc, f"{im.format or 'image'} metadata") from None


def _oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
    """(height, width) as shown, given the image's EXIF ``orientation``."""
    width, height = im.size
    transposed = orientation in (5, 6, 7, 8)  # these EXIF orientations rotate by 90 degrees
    return (width, height) if transposed else (height, width)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to RGB uint8 HxWx3 (EXIF-oriented) and its original (height, width).

    With ``target``, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still covers
    ``target`` x ``target``: a fraction of the work for a large photo and a small model input.
    Raises :class:`BadImage` for anything that is not a decodable image within ``max_pixels``.
    """
    im = open_image(data, max_pixels)
    orig = _oriented_size(im, _orientation(im))
    if target and im.format == "JPEG":
        im.draft("RGB", (target, target))
    _load(im)
    ImageOps.exif_transpose(im, in_place=True)
    return _as_uint8(im, "RGB"), orig


def decode_mask(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask to uint8 HxW with values 0/1 (ISIC binarises at > 128)."""
    im = open_image(data, max_pixels)
    _load(im)
    return (_as_uint8(im, "L") > 128).astype(np.uint8)


def to_model_input(images: list[np.ndarray], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """RGB uint8 HxWx3 images of any sizes -> uint8 [B, 3, size, size] on ``device``: the rows that cross
    Ray's object store (a quarter of float32's bytes); :class:`lesion_ray.inference.Runner` scales them
    to [0, 1] on the model's device."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        pixels = image if image.flags.writeable else image.copy()  # torch refuses read-only arrays
        out[i] = resize(torch.from_numpy(pixels).to(out.device, non_blocking=True).permute(2, 0, 1), size)
    return out


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size], bilinear with antialiasing (a triangle filter: no overshoot).

    On CPU the resize runs on uint8 (torch's channels-last uint8 kernel, several times faster than
    float32); elsewhere in float32, rounded back, so both agree within 1/255.
    """
    if image.shape[-2:] == (size, size):
        return image
    cpu = image.device.type == "cpu"
    resized = F.interpolate(image[None] if cpu else image[None].float(), size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return resized if cpu else resized.round_().clamp_(0, 255).to(torch.uint8)


# EXIF orientation -> the torch ops that undo it, as PIL's ImageOps.exif_transpose (on [.., H, W] tensors).
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: x.rot90(1, (-2, -1)),
}


def _nvjpeg() -> Any:
    """torchvision's JPEG decoder, or None without torchvision (it is not a dependency: a GPU image has it)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB, device="cuda")


class ModelInputs:
    """Encoded images -> model inputs inside an inference actor (``decode: gpu``): JPEGs decoded by nvJPEG
    on the actor's GPU and resized there, one batched call; a PNG, a JPEG nvJPEG refuses, or an actor
    without a GPU or torchvision takes the CPU path (:func:`decode_image`) per image. Headers are checked
    on the CPU first (:func:`open_image`), so a bad, truncated or oversized input is an error row either way."""

    def __init__(self, device: str | torch.device, size: int, max_pixels: int) -> None:
        self.device, self.size, self.max_pixels = torch.device(device), size, max_pixels
        self.decode_jpeg = _nvjpeg() if self.device.type == "cuda" else None
        self.on_gpu = self.on_cpu = 0  # images decoded each way, for the benchmark

    def __call__(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[tuple[int, int]], list[str]]:
        """uint8 [B, 3, size, size] on the device, the original (height, width) and an error ("" if none) each."""
        out = torch.zeros(len(blobs), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        sizes, errors = [(0, 0)] * len(blobs), [""] * len(blobs)
        jpegs: list[tuple[int, int]] = []  # (index, EXIF orientation) of the images for nvJPEG
        on_cpu: list[int] = []
        for i, blob in enumerate(blobs):
            try:
                im = open_image(blob, self.max_pixels)
                orientation = _orientation(im)
                sizes[i] = _oriented_size(im, orientation)
                # A JPEG without its end marker (truncated) goes to PIL, which names it; nvJPEG may pad it silently.
                if self.decode_jpeg and im.format == "JPEG" and im.mode in ("RGB", "L") and blob[-2:] == b"\xff\xd9":
                    jpegs.append((i, orientation))
                else:
                    on_cpu.append(i)
            except BadImage as exc:
                errors[i] = exc.reason
        for (i, orientation), decoded in zip(jpegs, self._gpu_decode([blobs[i] for i, _ in jpegs]), strict=True):
            if decoded is None:  # nvJPEG refused it: PIL decides, and names the error if there is one
                on_cpu.append(i)
                continue
            out[i] = resize(_ORIENT[orientation](decoded) if orientation in _ORIENT else decoded, self.size)
            self.on_gpu += 1
        for i in on_cpu:
            try:
                pixels, _ = decode_image(blobs[i], max_pixels=self.max_pixels, target=self.size)
                out[i] = to_model_input([pixels], self.size, self.device)[0]
                self.on_cpu += 1
            except BadImage as exc:
                errors[i], sizes[i] = exc.reason, (0, 0)
            except Exception as exc:  # a decoder bug on one file must not take down the other items
                errors[i], sizes[i] = f"{type(exc).__name__}: {exc}", (0, 0)
        return out, sizes, errors

    def _gpu_decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """One batched nvJPEG call; when it fails, image by image, None for those nvJPEG refuses."""
        if not blobs:
            return []
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self.decode_jpeg(data))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for one in data:
            try:
                decoded.append(self.decode_jpeg(one))
            except RuntimeError:
                decoded.append(None)
        return decoded


# --- Ray Data operators -------------------------------------------------------------------


def _read(uri: str) -> bytes | BadImage:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as exc:
        return BadImage(f"unreadable: {exc}")


def _read_all(uris: list[str]) -> dict[str, bytes | BadImage]:
    """Read a batch's objects concurrently: on S3 a read is mostly waiting for the network."""
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        return dict(zip(uris, pool.map(_read, uris), strict=True))


def _payload(blobs: dict[str, bytes | BadImage], uri: str) -> bytes:
    blob = blobs[uri]
    if isinstance(blob, BadImage):
        raise blob
    return blob


def _masks(
    blobs: dict[str, bytes | BadImage], uris: list[str], shape: tuple[int, int], size: int, max_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [C, size, size] 0/1 masks (nearest-neighbour) and float32 [C] "non-empty" flags."""
    masks = np.zeros((len(uris), size, size), np.uint8)
    present = np.zeros(len(uris), np.float32)
    for c, uri in enumerate(uris):
        try:
            mask = decode_mask(_payload(blobs, uri), max_pixels=max_pixels)
        except BadImage as exc:
            raise BadImage(f"mask {storage.basename(uri)}: {exc.reason}") from None
        if mask.shape != shape:
            raise BadImage(
                f"mask {storage.basename(uri)} is {mask.shape[1]}x{mask.shape[0]} "
                f"but its image is {shape[1]}x{shape[0]}"
            )
        present[c] = float(mask.any())
        masks[c] = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return masks, present


def _decode_row(
    blobs: dict[str, bytes | BadImage], source: str, mask_uris: list[str], size: int, task: int | None, max_pixels: int
) -> dict[str, Any]:
    pixels, (height, width) = decode_image(_payload(blobs, source), max_pixels=max_pixels, target=size)
    row: dict[str, Any] = {"pixels": pixels, "orig_height": height, "orig_width": width}
    if task is not None:
        if len(mask_uris) != _channels(task):
            raise BadImage(f"no Task {task} ground truth for this image")
        row["mask"], row["present"] = _masks(blobs, mask_uris, (height, width), size, max_pixels)
    return row


def _channels(task: int) -> int:
    return 1 if task == 1 else len(ATTRIBUTES)


def _failed_row(error: str, size: int, task: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"pixels": np.zeros((1, 1, 3), np.uint8), "orig_height": 0, "orig_width": 0}
    if task is not None:
        row["mask"] = np.zeros((_channels(task), size, size), np.uint8)
        row["present"] = np.zeros(_channels(task), np.float32)
    return row | {"error": error}


def _decode_batch(batch: dict[str, np.ndarray], size: int, task: int | None, max_pixels: int) -> dict[str, Any]:
    sources = [str(source) for source in batch["source"]]
    mask_uris = [[str(m) for m in masks] for masks in batch["masks"]]
    blobs = _read_all(sources + [m for masks in mask_uris for m in masks])
    rows = []
    for source, masks in zip(sources, mask_uris, strict=True):
        try:
            rows.append(_decode_row(blobs, source, masks, size, task, max_pixels) | {"error": ""})
        except BadImage as exc:
            rows.append(_failed_row(exc.reason, size, task))
        except Exception as exc:  # a decoder bug on one file must not take down the other items
            rows.append(_failed_row(f"{type(exc).__name__}: {exc}", size, task))
    out: dict[str, Any] = {"id": batch["id"], "source": batch["source"]}
    for key in rows[0]:
        out[key] = np.array([r[key] for r in rows]) if key != "pixels" else _ragged([r[key] for r in rows])
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _resize_batch(batch: dict[str, np.ndarray], size: int, device: str) -> dict[str, Any]:
    images = to_model_input(list(batch["pixels"]), size, device)
    out = {k: v for k, v in batch.items() if k != "pixels"}
    out["image"] = images.cpu().numpy()
    return out


def _fetch_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    sources = [str(source) for source in batch["source"]]
    read = _read_all(sources)
    blobs = [read[source] for source in sources]
    return {"id": batch["id"], "source": batch["source"],
            "data": [b"" if isinstance(b, BadImage) else b for b in blobs],
            "error": [b.reason if isinstance(b, BadImage) else "" for b in blobs]}


def _preprocess_batch(batch: dict[str, np.ndarray], size: int, task: int | None, max_pixels: int) -> dict[str, Any]:
    """Both operators in one CPU task: decoded images go straight to the resize, never into a block."""
    return _resize_batch(_decode_batch(batch, size, task, max_pixels), size, "cpu")


class _DeviceResize:
    """:func:`_resize_batch` in a GPU actor (the CUDA context is created once per actor)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _resize_batch(batch, self.size, "cuda")


def cluster_gpus() -> int:
    """Whole GPUs in the Ray cluster (0 on a CPU-only cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))


def _source_rows(sources: list[Sample] | list[str], task: int | None) -> list[dict[str, Any]]:
    rows = []
    for s in sources:
        if isinstance(s, str):
            rows.append({"id": sample_id(s), "source": s, "masks": []})
            continue
        masks: list[str] = []
        if task == 1 and s.segmentation:
            masks = [s.segmentation]
        elif task == 2 and s.attributes:
            masks = [s.attributes[a] for a in ATTRIBUTES]
        rows.append({"id": s.id, "source": s.image, "masks": masks})
    return rows


def image_dataset(
    sources: list[Sample] | list[str],
    *,
    size: int,
    task: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 16,
    device: str | None = None,
) -> ray.data.Dataset:
    """A streaming dataset with one row per source, in no particular order.

    Columns: ``id``, ``source``, ``image`` uint8 [3, size, size], ``orig_height``,
    ``orig_width``, ``error`` ("" when the row is usable); with ``task`` (training) also ``mask``
    uint8 [C, size, size] of 0/1 (C = 1 for task 1, 5 for task 2, ATTRIBUTES order) and
    ``present`` float32 [C]. ``device``: "cpu" or "cuda"; by default "cuda" when the cluster has
    GPUs. Failed rows carry zeros and their reason in ``error``.
    """
    if task not in (None, 1, 2):
        raise ValueError(f"task must be 1, 2 or None, got {task!r}")
    if not sources:
        raise ValueError("image_dataset needs at least one source")
    rows = _source_rows(sources, task)
    blocks = min(math.ceil(len(rows) / batch_size), _MAX_BLOCKS)
    return decoded(ray.data.from_items(rows, override_num_blocks=blocks), size=size, task=task,
                   max_pixels=max_pixels, batch_size=batch_size, device=device)


def decoded(
    ds: ray.data.Dataset,
    *,
    size: int,
    task: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 16,
    device: str | None = None,
    num_cpus: float = 1,
    compute: ray.data.TaskPoolStrategy | None = None,
) -> ray.data.Dataset:
    """``ds``'s source rows (``id``, ``source``, ``masks``) read, decoded and resized, as :func:`image_dataset`,
    in tasks of ``num_cpus`` each, ``compute`` capping how many run at once (None: as many as Ray's CPUs allow)."""
    options = {"size": size, "task": task, "max_pixels": max_pixels}
    gpus = cluster_gpus()
    if (device or ("cuda" if gpus else "cpu")) == "cpu":
        return ds.map_batches(_preprocess_batch, batch_size=batch_size, fn_kwargs=options, num_cpus=num_cpus,
                              compute=compute)
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, fn_kwargs=options, num_cpus=num_cpus, compute=compute)
    return ds.map_batches(
        _DeviceResize,
        batch_size=batch_size,
        num_gpus=_GPU_SHARE,
        fn_constructor_kwargs={"size": size},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(gpus, 1)),
    )


def fetched(ds: ray.data.Dataset, *, batch_size: int = 16, num_cpus: float = 1,
            compute: ray.data.TaskPoolStrategy | None = None) -> ray.data.Dataset:
    """``ds``'s source rows (``id``, ``source``) read, not decoded: ``data`` holds each file's bytes (empty, with
    ``error`` set, when it cannot be read), for inference actors that decode (:class:`ModelInputs`); tasks as in
    :func:`decoded`."""
    return ds.map_batches(_fetch_batch, batch_size=batch_size, num_cpus=num_cpus, compute=compute)
