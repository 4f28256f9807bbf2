"""Probabilities -> what a user gets, for batch (:mod:`lesion_ray.outputs`) and online (:mod:`lesion_ray.serve`)
prediction: ISIC masks at the original size, their PNGs and overlays. numpy and PIL only: the writing tasks
that run it never import torch.

- :func:`to_masks`: probabilities resized back to the image, thresholded, a Task 1 mask kept as
  its largest region with the holes filled (``postprocess``);
- :func:`mask_png`, :func:`tint` and :func:`overlay_png`: the ISIC 0/255 greyscale PNG of a mask, the image
  with its masks tinted in :data:`OVERLAY_COLOURS`, and the input | mask | overlay panel.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

Postprocess = Literal["none", "largest_component"]
# The lesion (Task 1); one colour per attribute in data.ATTRIBUTES order (Task 2). The web page (web/app.js)
# tints the lesion (Task 2: any attribute) in the Task 1 colour, at OVERLAY_ALPHA by default.
OVERLAY_COLOURS = {1: ((230, 25, 75),),
                   2: ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))}
OVERLAY_ALPHA = 0.45
OVERLAY_HEIGHT = 256


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


def overlay_png(image: np.ndarray, masks: np.ndarray) -> bytes:
    """input | mask | overlay, side by side at :data:`OVERLAY_HEIGHT`; masks are bool [C, H, W]."""
    height = min(OVERLAY_HEIGHT, masks.shape[1])
    width = max(1, round(masks.shape[2] * height / masks.shape[1]))
    picture = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    small = np.stack([np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
                      for mask in masks])
    # Task 1: a white mask (as the tutorial shows it); Task 2: each attribute in its overlay colour.
    painted = np.zeros_like(picture)
    colours = [(255, 255, 255)] if len(masks) == 1 else OVERLAY_COLOURS[2]
    for mask, colour in zip(small, colours, strict=True):
        painted[mask] = colour
    panel = np.concatenate([picture, painted, tint(picture, small)], axis=1)
    out = io.BytesIO()
    Image.fromarray(panel, "RGB").save(out, format="PNG")
    return out.getvalue()
