"""The official ISIC 2018 segmentation scores, in pure numpy.

Scoring parallelises: :func:`pixel_counts` and :func:`mask_counts` turn mask pairs into TP, FP, FN, TN anywhere (a
Ray Data batch, a training worker); the reductions take the stacked counts (``[..., 4]``, :data:`COUNTS` order).

Definitions follow the ISIC challenge scoring code (ImageMarkup/isic-challenge-scoring):
- both masks are binarised at value > 128;
- Task 1: every score is computed per image and averaged over images; the headline "threshold Jaccard" sets any
  per-image Jaccard below 0.65 to 0;
- Task 2 (2018): TP, FP and FN of every (image, attribute) pair are divided by the image's pixel count, summed over
  all images and attributes, and one Jaccard is taken from the sums (pooled, not a mean). Per-attribute Jaccard and
  Dice pool over images the same way;
- a ratio whose denominator is 0 scores 1.0: an empty ground truth with an empty prediction is a perfect answer,
  and sensitivity (specificity) is 1.0 without positive (negative) pixels.

The official code refuses a submission with a missing, unreadable or wrongly sized prediction; a batch job must
not stop on one file, so evaluate reports each and scores it as an all-zero prediction (``prediction=None``).
"""

from __future__ import annotations

import numpy as np

THRESHOLD = 128
JACCARD_FLOOR = 0.65
COUNTS = ("tp", "fp", "fn", "tn")


def binarize(mask: np.ndarray) -> np.ndarray:
    """A 0..255 mask as booleans, True where the value is above 128 (the official rule)."""
    return np.asarray(mask) > THRESHOLD


def pixel_counts(truth: np.ndarray, prediction: np.ndarray | None) -> np.ndarray:
    """TP, FP, FN, TN of one mask pair (int64 ``[4]``); ``prediction=None`` scores an all-zero mask.
    Raises ValueError when the two masks differ in size: the caller decides how to report it."""
    t = binarize(truth)
    if prediction is None:
        p = np.zeros_like(t)
    else:
        p = binarize(prediction)
        if p.shape != t.shape:
            raise ValueError(f"prediction is {p.shape[1]}x{p.shape[0]}, ground truth is {t.shape[1]}x{t.shape[0]}")
    return mask_counts(t, p)


def mask_counts(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """TP, FP, FN, TN (int64 ``[..., 4]``) of boolean mask pairs ``[..., H, W]``."""
    pixels, rows = truth.shape[-2] * truth.shape[-1], []
    # Pair by pair: count_nonzero over a whole array is several times faster than along axes.
    for t, p in zip(truth.reshape(-1, pixels), prediction.reshape(-1, pixels), strict=True):
        tp = np.count_nonzero(t & p)
        fp, fn = np.count_nonzero(p) - tp, np.count_nonzero(t) - tp
        rows.append([tp, fp, fn, t.size - tp - fp - fn])
    return np.array(rows, dtype=np.int64).reshape(*truth.shape[:-2], 4)


def _split(counts: np.ndarray) -> tuple[np.ndarray, ...]:
    c = np.asarray(counts, dtype=np.float64)
    return c[..., 0], c[..., 1], c[..., 2], c[..., 3]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # The official convention: 0/0 is a perfect score.
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


def jaccard(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn, _ = _split(counts)
    return _ratio(tp, tp + fp + fn)


def threshold_jaccard(counts: np.ndarray) -> np.ndarray:
    j = jaccard(counts)
    return np.where(j >= JACCARD_FLOOR, j, 0.0)


def dice(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn, _ = _split(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def sensitivity(counts: np.ndarray) -> np.ndarray:
    tp, _, fn, _ = _split(counts)
    return _ratio(tp, tp + fn)


def specificity(counts: np.ndarray) -> np.ndarray:
    _, fp, _, tn = _split(counts)
    return _ratio(tn, tn + fp)


def accuracy(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn, tn = _split(counts)
    return _ratio(tp + tn, tp + fp + fn + tn)


TASK1_SCORES = {"threshold_jaccard": threshold_jaccard, "jaccard": jaccard, "dice": dice,
                "sensitivity": sensitivity, "specificity": specificity, "accuracy": accuracy}


def image_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every Task 1 score per image, for ``counts`` of shape ``[N, 4]``."""
    return {name: fn(counts) for name, fn in TASK1_SCORES.items()}


def task1_scores(counts: np.ndarray) -> dict[str, float]:
    """Task 1: the mean over images of each per-image score; ``counts`` is ``[N, 4]``, N >= 1."""
    counts = np.asarray(counts).reshape(-1, 4)
    if len(counts) == 0:
        raise ValueError("no images to score")
    return {name: float(values.mean()) for name, values in image_scores(counts).items()}


def task2_scores(counts: np.ndarray, pixels: np.ndarray, attributes: list[str] | np.ndarray) -> dict:
    """Task 2 (2018): the pooled Jaccard and Dice, overall and per attribute. ``counts[i]`` are the pixel counts
    of pair i, ``pixels[i]`` its image's pixel count and ``attributes[i]`` its attribute name."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 4)
    if len(counts) == 0:
        raise ValueError("no attribute masks to score")
    normalised = counts / np.asarray(pixels, dtype=np.float64)[:, None]
    attributes = np.asarray(attributes)
    per_attribute = {name: _pooled(normalised[attributes == name]) for name in sorted(set(attributes.tolist()))}
    return {**_pooled(normalised), "per_attribute": per_attribute}


def _pooled(normalised: np.ndarray) -> dict[str, float]:
    pooled = normalised.sum(axis=0)
    return {"jaccard": float(jaccard(pooled)), "dice": float(dice(pooled))}


def confusion_matrix(counts: np.ndarray, labels: tuple[str, str] = ("not lesion", "lesion")) -> dict:
    """The pixel confusion matrix summed over ``counts`` (``[..., 4]``): rows are the ground truth, columns the
    prediction, both in ``labels`` order (negative first). ``percent`` divides each row by its total, so the
    diagonal is each class's recall, as the tutorial's percentage view shows it."""
    tp, fp, fn, tn = (int(v) for v in np.asarray(counts, dtype=np.int64).reshape(-1, 4).sum(axis=0))
    cells = [[tn, fp], [fn, tp]]
    matrix = np.array(cells, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    percent = np.divide(100 * matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    return {"labels": list(labels), "counts": cells, "percent": [[round(float(v), 4) for v in row] for row in percent]}
