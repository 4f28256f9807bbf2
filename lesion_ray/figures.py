"""What a person looks at: training curves and their table, the pixel confusion matrix, truth-vs-prediction tiles.

Figures come as image bytes (PNG; the photographic tiles JPEG), drawn with Pillow alone, written beside a
run's outputs and embedded in its ``report.html`` (:mod:`lesion_ray.report_page`).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Tile colours: predicted and true (TP), predicted only (FP), missed (FN).
AGREE, PREDICTED_ONLY, MISSED = (40, 200, 60), (235, 40, 40), (40, 120, 255)
TILE_HEIGHT = 180


def _encoded(image: Image.Image, image_format: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def history_csv(history: list[dict[str, Any]]) -> str:
    """A training history as CSV: one row per epoch, every key any epoch has as a column."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def plot_history(history: list[dict[str, Any]], task: int) -> bytes:
    """A PNG line chart: train and validation loss (left axis), validation score in [0, 1] (right)."""
    width, height = 720, 380
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    left, right, top, bottom = 64, width - 48, 40, height - 46
    draw.rectangle((left, top, right, bottom), outline="#888888")
    epochs = [row["epoch"] for row in history]
    losses = [row[k] for row in history for k in ("train_loss", "val_loss")]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1

    def x_of(epoch: float) -> float:
        span = max(epochs[-1] - epochs[0], 1)
        return left + (epoch - epochs[0]) / span * (right - left)

    def y_of(value: float, lo: float, hi: float) -> float:
        return bottom - (value - lo) / (hi - lo) * (bottom - top)

    score_name = "validation thresholded Jaccard" if task == 1 else "validation pooled Jaccard"
    series = [("train_loss", "training loss", "#1f77b4", (lo, hi)),
              ("val_loss", "validation loss", "#ff7f0e", (lo, hi)), ("val_score", score_name, "#2ca02c", (0.0, 1.0))]
    x = left
    for key, label, colour, (a, b) in series:
        points = [(x_of(row["epoch"]), y_of(row[key], a, b)) for row in history]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.line((x, 20, x + 18, 20), fill=colour, width=3)
        draw.text((x + 24, 12), label, fill=colour, font=font)
        x += 24 + draw.textlength(label, font=font) + 28
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line((left, y, right, y), fill="#eeeeee")
        draw.text((left - 6, y), f"{lo + frac * (hi - lo):.2f}", fill="black", font=font, anchor="rm")
        draw.text((right + 6, y), f"{frac:.2f}", fill="#2ca02c", font=font, anchor="lm")
    step = max(1, round(len(epochs) / 10))
    for epoch in epochs[::step] + ([epochs[-1]] if (len(epochs) - 1) % step else []):
        draw.text((x_of(epoch), bottom + 6), str(epoch), fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, bottom + 26), "epoch", fill="black", font=font, anchor="mt")
    return _encoded(img)


def confusion_figure(cm: dict[str, Any], title: str) -> bytes:
    """The confusion matrix as a PNG: counts and row percentages, shaded by percentage."""
    cell_w, cell_h, left, top = 190, 90, 130, 90
    image = Image.new("RGB", (left + 2 * cell_w + 20, top + 2 * cell_h + 20), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((left, top - 50), "predicted ->", fill="black", font=font)
    draw.text((10, top - 25), "truth", fill="black", font=font)
    for i, label in enumerate(cm["labels"]):
        draw.text((left + i * cell_w + 10, top - 25), label, fill="black", font=font)
        draw.text((10, top + i * cell_h + cell_h // 2 - 8), label, fill="black", font=font)
    for i in range(2):
        for j in range(2):
            percent = cm["percent"][i][j]
            shade = int(255 - 2.2 * percent)
            x, y = left + j * cell_w, top + i * cell_h
            draw.rectangle((x, y, x + cell_w, y + cell_h), fill=(shade, shade, 255), outline="black")
            ink = "white" if percent > 55 else "black"
            draw.text((x + 12, y + 20), f"{cm['counts'][i][j]:,} px\n{percent:.2f} %", fill=ink, font=font)
    return _encoded(image)


def comparison_tile(image: np.ndarray | None, truth: np.ndarray, prediction: np.ndarray) -> bytes:
    """A JPEG: image | truth vs prediction, side by side at :data:`TILE_HEIGHT`: pixels both call lesion in
    green, predicted only in red, missed in blue. ``truth`` and ``prediction`` are bool [H, W] at the
    image's size (Task 2: the union of the attributes); ``image`` is RGB uint8, or None (grey)."""
    height = min(TILE_HEIGHT, truth.shape[0])
    width = max(1, round(truth.shape[1] * height / truth.shape[0]))
    if image is None:
        picture = np.full((height, width, 3), 128, np.float32)
    else:
        picture = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR), np.float32)

    def shrink(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height),
                                                                             Image.Resampling.NEAREST)) > 0

    truth, prediction = shrink(truth), shrink(prediction)
    blended = picture.copy()
    for where, colour in ((truth & prediction, AGREE), (prediction & ~truth, PREDICTED_ONLY),
                          (truth & ~prediction, MISSED)):
        blended[where] = 0.6 * picture[where] + 0.4 * np.array(colour, np.float32)
    gap = np.full((height, 4, 3), 255, np.float32)
    tile = Image.fromarray(np.concatenate([picture, gap, blended], axis=1).astype(np.uint8), "RGB")
    return _encoded(tile, "JPEG", quality=88)
