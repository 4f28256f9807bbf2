"""One inference path for batch (:mod:`lesion_ray.predict`) and online (:mod:`lesion_ray.serve`)
prediction: model inputs -> probabilities -> ISIC masks at the original size -> PNGs and overlays.

- :class:`Runner`: a model made ready once for its device and :class:`ModelRuntime` (precision, memory
  format, ``torch.compile``), then batches of uint8 images -> sigmoid mask probabilities and both
  heads' probabilities, optionally averaged over flips (test-time augmentation); the images are scaled
  on the model's device, so rows cross Ray's object store at a quarter of float32's size;
- :func:`to_masks`: probabilities resized back to the image, thresholded, a Task 1 mask kept as
  its largest region with the holes filled (``postprocess``);
- :func:`mask_png` and :func:`tint`: the ISIC 0/255 greyscale PNG of a mask and the image with
  its masks tinted in :data:`OVERLAY_COLOURS`.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field
from torch import nn

from lesion_ray import report

Postprocess = Literal["none", "largest_component"]
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast
# The lesion (Task 1); one colour per attribute in data.ATTRIBUTES order (Task 2). The web page (web/app.js)
# tints the lesion (Task 2: any attribute) in the Task 1 colour, at OVERLAY_ALPHA by default.
OVERLAY_COLOURS = {1: ((230, 25, 75),),
                   2: ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))}
OVERLAY_ALPHA = 0.45


class ModelRuntime(BaseModel):
    """How a model runs for inference; the predict and serve specs take these keys."""

    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 mixed precision (autocast; bf16 also on "
                                                     "CPUs, fp16 is for GPUs)")
    channels_last: bool = Field(False, description="NHWC memory format (faster convolutions on GPUs with bf16/fp16)")
    compile: bool = Field(False, description="torch.compile the model once per process (minutes of start-up; "
                                             "falls back to eager with a warning where it fails)")


class Runner:
    """A model ready for batches on ``device``: eval mode, memory format and (with ``compile``) compiled once,
    with a warm-up pass of ``batch_size`` images so that compilation happens here, not in the first request.
    A compiled model sees only that batch size (smaller batches are padded): it never compiles again."""

    def __init__(self, model: nn.Module, device: str | torch.device, runtime: ModelRuntime, input_size: int,
                 batch_size: int) -> None:
        self.device = torch.device(device)
        self.runtime = runtime
        self.autocast = AUTOCAST_DTYPES.get(runtime.precision)
        model = model.to(self.device).eval()
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.batch_size, self.compiled = model, batch_size, False
        self.compile_error: str | None = None  # why torch.compile was given up, if it was
        if runtime.compile:
            self.model, self.compiled = torch.compile(model), True
            try:
                self(torch.zeros(batch_size, 3, input_size, input_size, dtype=torch.uint8))
            except Exception as exc:  # no compiler, an unsupported op or device: eager still works
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                report.info(f"warning: torch.compile failed, the model runs uncompiled: {self.compile_error}")
                self.model, self.compiled = model, False

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, S, S] images (0-255; float in [0, 1] also taken) on any device -> float32 mask
        probabilities [B, C, S, S] and both heads' probabilities [B, C], on the model's device."""
        count = len(images)
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.compiled and count < self.batch_size:  # compiled for one batch size
            x = torch.cat([x, x.new_zeros(self.batch_size - count, *x.shape[1:])])
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            outputs = _forward(self.model, x, tta)
        return tuple(o[:count].float() for o in outputs)  # type: ignore[return-value]


def _forward(model: nn.Module, images: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask probabilities [B, C, S, S] and both heads' "present" probabilities [B, C]; with ``tta``,
    the average over the image and its horizontal and vertical flips."""
    flips = [(), (3,), (2,)] if tta else [()]
    probs = head1 = head2 = 0
    for dims in flips:
        logits, h1, h2 = model(images.flip(dims) if dims else images)
        p = torch.sigmoid(logits)
        probs = probs + (p.flip(dims) if dims else p)
        head1, head2 = head1 + torch.sigmoid(h1), head2 + torch.sigmoid(h2)
    return probs / len(flips), head1 / len(flips), head2 / len(flips)


def to_masks(probs: np.ndarray, height: int, width: int, threshold: float,
             postprocess: Postprocess = "none") -> np.ndarray:
    """[C, S, S] probabilities -> bool [C, height, width]: bilinear resize, then threshold.

    ``largest_component`` applies to a one-channel (Task 1) map only: Task 2 attribute masks are
    many small regions (dots, lines) by nature.
    """
    out = np.empty((len(probs), height, width), bool)
    for c, channel in enumerate(probs):
        resized = Image.fromarray(channel.astype(np.float32), "F").resize((width, height), Image.Resampling.BILINEAR)
        mask = np.asarray(resized) > threshold
        out[c] = largest_component(mask) if postprocess == "largest_component" and len(probs) == 1 else mask
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a bool [H, W] mask, its holes filled (as MONAI's
    KeepLargestConnectedComponent + FillHoles): an ISIC Task 1 lesion is one region without holes.

    Works on horizontal runs of pixels rather than pixels, so a full-size ISIC mask (12 Mpx) costs
    a few numpy passes and a Python loop over its runs.
    """
    if not mask.any():
        return mask
    rows, starts, stops = _runs(mask)
    labels = _run_components(rows, starts, stops, diagonal=True)
    keep = labels == np.bincount(labels, weights=stops - starts).argmax()
    kept = _paint(rows[keep], starts[keep], stops[keep], mask.shape)
    # Holes: background regions that do not reach the border; 4-connected, the dual of the lesion's 8.
    rows, starts, stops = _runs(~kept)
    labels = _run_components(rows, starts, stops, diagonal=False)
    border = (rows == 0) | (rows == mask.shape[0] - 1) | (starts == 0) | (stops == mask.shape[1])
    outside = np.isin(labels, labels[border])
    return ~_paint(rows[outside], starts[outside], stops[outside], mask.shape)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of True in a bool [H, W]: row, start, stop (exclusive), in row-major order."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    return rows, starts, stops


def _run_components(rows: np.ndarray, starts: np.ndarray, stops: np.ndarray, diagonal: bool) -> np.ndarray:
    """A region label per run: union-find over runs that touch in adjacent rows (corners too if ``diagonal``)."""
    if not len(rows):
        return np.zeros(0, np.int64)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach = int(diagonal)
    first = np.searchsorted(rows, np.arange(rows[-1] + 2)).tolist()  # first run of each row
    start, stop = starts.tolist(), stops.tolist()
    for row in range(rows[-1]):
        a, b = first[row], first[row + 1]
        a_end, b_end = first[row + 1], first[row + 2]
        while a < a_end and b < b_end:  # both rows' runs are sorted: one merge-like pass
            if start[a] < stop[b] + reach and start[b] < stop[a] + reach:
                parent[find(a)] = find(b)
            if stop[a] < stop[b]:
                a += 1
            else:
                b += 1
    return np.array([find(i) for i in range(len(parent))])


def _paint(rows: np.ndarray, starts: np.ndarray, stops: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Runs back to a bool mask: +1 where a run starts, -1 where it stops, running sum along each row."""
    marks = np.zeros((shape[0], shape[1] + 1), np.int8)
    marks[rows, starts] = 1  # runs of one row never share a start or stop: no index repeats
    marks[rows, stops] = -1
    return np.cumsum(marks, axis=1, dtype=np.int8)[:, :-1] > 0


def mask_png(mask: np.ndarray) -> bytes:
    """A bool [H, W] mask as the ISIC submission format: single-channel PNG, 0 and 255."""
    out = io.BytesIO()
    # Level 1: binary masks compress well anyway, and encoding is the write stage's main cost.
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def tint(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] with each bool mask channel [C, H, W] (same size) tinted in its overlay colour.

    Only the masked pixels are blended in float: a full-size ISIC photo stays uint8 (36 MB, not 144).
    """
    out = image.copy()
    for mask, colour in zip(masks, OVERLAY_COLOURS[1 if len(masks) == 1 else 2], strict=True):
        blended = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * np.array(colour, np.float32)
        out[mask] = np.round(blended).astype(np.uint8)
    return out
