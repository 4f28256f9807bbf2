"""Image preprocessing as streaming Ray Data operators: read, decode, resize to the model's input as uint8.

``image_dataset`` builds one CPU operator (two with a GPU resize) over a dataset of source rows (id, URI, mask
URIs):

1. decode (CPU tasks): bytes through :mod:`lesion_ray.storage`, PIL decode in JPEG draft mode when
   the model input is small, EXIF orientation, RGB conversion (greyscale, palette, RGBA, CMYK,
   16-bit), a decompression-bomb limit, masks resized with nearest neighbour and binarised;
2. resize (:func:`to_model_input`, PIL) in the same CPU task, straight after the decode, or on GPU actors
   when the cluster has GPUs (:class:`lesion_ray.inference.DeviceResize`). Rows stay uint8 [3, S, S]: the
   model's side scales them.

For ``decode: gpu`` (:func:`fetched`, :class:`lesion_ray.inference.ModelInputs`) read tasks only move bytes
and the inference actors decode JPEGs with nvJPEG on their GPU (torchvision, not a dependency: a GPU image
has it). numpy and PIL only: the decoding tasks' processes never import torch (seconds of CPU each).
A batch's objects are read by a few threads at once (an S3 read is mostly network wait).

Every input yields exactly one row; anything wrong with an item becomes that row's ``error``
text, never an exception, so a job can account for every input. Rows stream through the
pipeline: memory does not grow with the number of images.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any

import numpy as np
import ray
from PIL import Image, ImageOps, UnidentifiedImageError

from lesion_ray import storage
from lesion_ray.data import ATTRIBUTES, Sample, sample_id

# 5x the largest ISIC 2018 image (4,288 x 2,848); a larger header is a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000
LARGEST_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses larger images, whatever max_pixels allows
_MAX_BLOCKS = 1000
# Logical share of a GPU per resize actor: resizing is light, and model actors or Ray Train
# workers that follow in the same job must still find their GPU free.
_GPU_SHARE = 0.25
# A short job's stage may get fewer blocks than its tasks or actors; Ray Data's hint about it means nothing to a user.
warnings.filterwarnings("ignore", message="The (maximum|minimum) number of concurrent (tasks|actors) for",
                        category=UserWarning)


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


def orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag (1: as stored)."""
    try:
        # Reading EXIF can mean reading the file (PNG keeps it in chunks after the pixel data).
        return im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _broken(exc, f"{im.format or 'image'} metadata") from None


def oriented_size(im: Image.Image, orientation: int) -> tuple[int, int]:
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
    orig = oriented_size(im, orientation(im))
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


def to_model_input(images: list[np.ndarray], size: int) -> np.ndarray:
    """RGB uint8 HxWx3 images of any sizes -> uint8 [B, 3, size, size]: the rows that cross Ray's object store
    (a quarter of float32's bytes); :class:`lesion_ray.inference.Runner` scales them to [0, 1] on the model's
    device. Bilinear with antialiasing (PIL's triangle filter, which torch's ``antialias=True`` reproduces:
    :func:`lesion_ray.inference.resize` on a GPU agrees within 1/255)."""
    out = np.empty((len(images), 3, size, size), np.uint8)
    for i, image in enumerate(images):
        fitted = image if image.shape[:2] == (size, size) else np.asarray(
            Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        out[i] = fitted.transpose(2, 0, 1)
    return out


# --- Ray Data operators -------------------------------------------------------------------


def _read(uri: str) -> bytes | BadImage:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as exc:
        return BadImage(f"unreadable: {exc}")


def _read_all(uris: list[str]) -> dict[str, bytes | BadImage]:
    """Read a batch's objects concurrently."""
    return dict(zip(uris, storage.concurrently(_read, uris), strict=True))


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


def _fetch_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    sources = [str(source) for source in batch["source"]]
    read = _read_all(sources)
    blobs = [read[source] for source in sources]
    return {"id": batch["id"], "source": batch["source"],
            "data": [b"" if isinstance(b, BadImage) else b for b in blobs],
            "error": [b.reason if isinstance(b, BadImage) else "" for b in blobs]}


def _preprocess_batch(batch: dict[str, np.ndarray], size: int, task: int | None, max_pixels: int) -> dict[str, Any]:
    """Both operators in one CPU task: decoded images go straight to the resize, never into a block."""
    out = _decode_batch(batch, size, task, max_pixels)
    out["image"] = to_model_input(list(out.pop("pixels")), size)
    return out


def cluster_gpus() -> int:
    """Whole GPUs in the Ray cluster (0 on a CPU-only cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))


def one_node_cores() -> int | None:
    """The cores of a one-node Ray cluster (this machine's), None on several nodes: Ray's logical CPUs say nothing
    of the cores (the embedded default has at least 8 on any machine)."""
    return None if sum(node["Alive"] for node in ray.nodes()) > 1 else os.cpu_count() or 1


def task_pool() -> ray.data.TaskPoolStrategy:
    """How many tasks of a CPU stage run at once: on one node one per core, which the OS shares with whatever else
    computes (a task beyond the cores is one more process that imports Ray Data and takes a core from the rest), on
    several nodes as many as Ray's CPUs allow."""
    return ray.data.TaskPoolStrategy(size=one_node_cores())


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
) -> ray.data.Dataset:
    """``ds``'s source rows (``id``, ``source``, ``masks``) read, decoded and resized, as :func:`image_dataset`,
    in tasks of ``num_cpus`` each, as many at once as :func:`task_pool` says."""
    options = {"size": size, "task": task, "max_pixels": max_pixels}
    gpus = cluster_gpus()
    compute = task_pool()
    if (device or ("cuda" if gpus else "cpu")) == "cpu":
        return ds.map_batches(_preprocess_batch, batch_size=batch_size, fn_kwargs=options, num_cpus=num_cpus,
                              compute=compute)
    # Here only, where the driver has it already: the decoding tasks' processes never import torch.
    from lesion_ray.inference import DeviceResize

    ds = ds.map_batches(_decode_batch, batch_size=batch_size, fn_kwargs=options, num_cpus=num_cpus, compute=compute)
    return ds.map_batches(
        DeviceResize,
        batch_size=batch_size,
        num_gpus=_GPU_SHARE,
        fn_constructor_kwargs={"size": size},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(gpus, 1)),
    )


def fetched(ds: ray.data.Dataset, *, batch_size: int = 16, num_cpus: float = 1) -> ray.data.Dataset:
    """``ds``'s source rows (``id``, ``source``) read, not decoded: ``data`` holds each file's bytes (empty, with
    ``error`` set, when it cannot be read), for inference actors that decode (:class:`ModelInputs`); tasks as in
    :func:`decoded`."""
    return ds.map_batches(_fetch_batch, batch_size=batch_size, num_cpus=num_cpus, compute=task_pool())
