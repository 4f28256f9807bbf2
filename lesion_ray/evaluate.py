"""``kind: evaluate``: score predicted masks against ISIC ground truth with the official scores.

Every ground-truth mask is one scoring pair. Pairs are read and counted in parallel Ray Data
tasks (:func:`lesion_ray.metrics.pixel_counts`); the driver only sums the small per-pair
counts into the Task 1 / Task 2 scores (:mod:`lesion_ray.metrics`). Predictions are matched
to ground truth by id (and attribute) in their file names, as the official code does:
``<id>_segmentation.png`` or ``<id>_attribute_<name>.png``, anywhere under ``predictions``.

A missing, unreadable, ambiguous (two files for one mask) or wrongly sized prediction is
listed in the report and scored as an all-zero mask (see :mod:`lesion_ray.metrics`); an
unreadable ground-truth mask is listed and left out of the scores.

Outputs under ``output``: ``report.json`` (scores, confusion matrix as counts and
percentages, every problem by id), ``confusion_matrix.png`` and ``pairs.parquet`` (counts
and Task 1 scores per pair, to find the worst images).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image, ImageDraw, ImageFont

from lesion_ray import data, metrics, report, storage
from lesion_ray.spec import InputUri, JobSpec, OutputUri, param

# Statuses of a scoring pair; all but "bad_truth" are scored.
PROBLEMS = ("missing", "unreadable", "wrong_size", "ambiguous", "bad_truth")
REPORT_FILE = "report.json"
FIGURE_FILE = "confusion_matrix.png"
PAIRS_FILE = "pairs.parquet"
_PREDICTION_NAME = re.compile(
    rf"_(?:segmentation|attribute_(?P<attribute>{'|'.join(data.ATTRIBUTES)}))(?:_prediction)?\.png$"
)


@dataclass(kw_only=True)
class EvaluateSpec(JobSpec):
    predictions: InputUri
    ground_truth: InputUri
    output: OutputUri
    task: Literal[1, 2] = param(1, help="1: lesion masks (thresholded Jaccard); 2: attribute masks (pooled Jaccard)")
    subset: Literal["Training", "Validation", "Test"] = param(
        "Validation", help="which subset's ground truth to score when ground_truth is an ISIC root")
    batch_size: int = param(16, min=1, help="mask pairs per Ray Data task")


SPEC = EvaluateSpec


def index_predictions(uri: str) -> dict[tuple[str, str], list[str]]:
    """(id, "segmentation" or attribute name) -> prediction URIs, from one listing of ``uri``."""
    found: dict[tuple[str, str], list[str]] = {}
    for info in storage.list_files(uri, (".png",)):
        match = _PREDICTION_NAME.search(storage.basename(info.uri))
        if match:
            key = (data.sample_id(info.uri), match["attribute"] or "segmentation")
            found.setdefault(key, []).append(info.uri)
    return found


def pair_items(truth: dict[str, dict[str, str]], predictions: dict[tuple[str, str], list[str]]) -> list[dict]:
    """One scoring pair per ground-truth mask, with its prediction (or why there is none)."""
    items = []
    for image_id in sorted(truth):
        for key, truth_uri in sorted(truth[image_id].items()):
            candidates = predictions.get((image_id, key), [])
            status = {0: "missing", 1: "ok"}.get(len(candidates), "ambiguous")
            items.append({
                "id": image_id,
                "attribute": key,
                "truth": truth_uri,
                "prediction": candidates[0] if status == "ok" else "",
                "status": status,
                "detail": ", ".join(candidates) if status == "ambiguous" else "",
            })
    return items


def read_mask(uri: str) -> np.ndarray:
    """A single-channel mask as uint8 HxW; ValueError says why a file is not one."""
    raw = storage.read_bytes(uri)
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Exception as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if image.mode == "1":
        image = image.convert("L")
    if image.mode != "L":
        raise ValueError(f"not a single-channel greyscale image (mode {image.mode})")
    return np.asarray(image)


def _score_pair(item: dict[str, Any]) -> tuple[str, str, np.ndarray, int]:
    """(status, detail, counts, pixels) of one pair."""
    status, detail = item["status"], item["detail"]
    try:
        truth = read_mask(item["truth"])
    except (ValueError, storage.StorageError) as exc:
        return "bad_truth", str(exc), np.zeros(4, np.int64), 0
    if status == "ok":
        try:
            prediction = read_mask(item["prediction"])
        except (ValueError, storage.StorageError) as exc:
            status, detail = "unreadable", str(exc)
        else:
            try:
                return status, detail, metrics.pixel_counts(truth, prediction), truth.size
            except ValueError as exc:  # the sizes differ
                status, detail = "wrong_size", str(exc)
    return status, detail, metrics.pixel_counts(truth, None), truth.size


def score_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data operator: mask pairs -> per-pair status and pixel counts."""
    rows = [_score_pair({k: batch[k][i] for k in batch}) for i in range(len(batch["id"]))]
    counts = np.stack([r[2] for r in rows]) if rows else np.zeros((0, 4), np.int64)
    out = {k: np.asarray(batch[k]) for k in ("id", "attribute", "prediction")}
    out.update(status=np.array([r[0] for r in rows]), detail=np.array([r[1] for r in rows]),
               pixels=np.array([r[3] for r in rows], dtype=np.int64))
    out.update({name: counts[:, i] for i, name in enumerate(metrics.COUNTS)})
    return out


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
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run(spec: EvaluateSpec) -> dict[str, Any]:
    truth = data.discover_ground_truth(spec.ground_truth, spec.subset, spec.task)
    if not truth:
        raise ValueError(
            f"no Task {spec.task} ground truth found under {spec.ground_truth} (subset {spec.subset}): point "
            "ground_truth at an ISIC root or at its ground-truth folder, and check task and subset")
    predictions = index_predictions(spec.predictions)
    items = pair_items(truth, predictions)
    extra = len(set(predictions) - {(item["id"], item["attribute"]) for item in items})
    report.info(f"scoring {len(items)} masks of {len(truth)} images; {len(predictions)} predictions found")

    ds = ray.data.from_items(items).map_batches(score_batch, batch_size=spec.batch_size)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    counts = np.stack([table[name].to_numpy() for name in metrics.COUNTS], axis=1)
    status = table["status"].to_numpy(zero_copy_only=False)
    scored = status != "bad_truth"
    if not scored.any():
        raise ValueError(f"none of the {len(items)} ground-truth masks could be read, e.g. "
                         f"{table['id'][0]}: {table['detail'][0]}")

    if spec.task == 1:
        scores = metrics.task1_scores(counts[scored])
        labels = ("not lesion", "lesion")
    else:
        scores = metrics.task2_scores(counts[scored], table["pixels"].to_numpy()[scored],
                                      table["attribute"].to_numpy(zero_copy_only=False)[scored])
        labels = ("absent", "present")
    cm = metrics.confusion_matrix(counts[scored], labels)
    problems = {
        name: [{"id": r["id"], "attribute": r["attribute"], "detail": r["detail"]}
               for r in table.filter(pc.equal(table["status"], name)).select(
                   ["id", "attribute", "detail"]).to_pylist()]
        for name in PROBLEMS
    }
    for name, values in metrics.image_scores(counts).items():
        table = table.append_column(name, pa.array(values))

    out = storage.normalize(spec.output)
    result = {
        "task": spec.task,
        "predictions": storage.normalize(spec.predictions),
        "ground_truth": storage.normalize(spec.ground_truth),
        "images": len(truth),
        "masks": len(items),
        "scored": int(scored.sum()),
        "scores": scores,
        "confusion_matrix": cm,
        "problem_counts": {name: len(rows) for name, rows in problems.items()},
        "extra_predictions": extra,
        "problems": problems,
    }
    storage.write_text(storage.join(out, REPORT_FILE), json.dumps(result, indent=2))
    headline = "threshold_jaccard" if spec.task == 1 else "jaccard"
    title = f"Task {spec.task} pixels, {result['scored']} masks; {headline} {scores[headline]:.4f}"
    storage.write_bytes(storage.join(out, FIGURE_FILE), confusion_figure(cm, title))
    with storage.open_write(storage.join(out, PAIRS_FILE)) as f:
        pq.write_table(table, f)

    summary: dict[str, Any] = {"task": spec.task, "images": len(truth), "masks": len(items)}
    summary.update({k: v for k, v in scores.items() if k != "per_attribute"})
    summary["problems"] = result["problem_counts"]
    summary.update(report=storage.join(out, REPORT_FILE), figure=storage.join(out, FIGURE_FILE))
    return summary
