"""``kind: evaluate``: score predicted masks against ISIC ground truth with the official scores.

Every ground-truth mask is one scoring pair. Pairs are read and counted in parallel Ray Data
tasks (:func:`lesion_ray.metrics.pixel_counts`); the driver only sums the small per-pair
counts into the Task 1 / Task 2 scores (:mod:`lesion_ray.metrics`). Predictions are matched
to ground truth by id (and attribute) in their file names, as the official code does:
``<id>_segmentation.png`` or ``<id>_attribute_<name>.png``, anywhere under ``predictions``.

A missing, unreadable, ambiguous (two files for one mask) or wrongly sized prediction is
listed in the report and scored as an all-zero mask (see :mod:`lesion_ray.metrics`); an
unreadable ground-truth mask is listed and left out of the scores.

Outputs under ``output``: ``report.html`` (one self-contained page: the scores, the confusion
matrix, the worst, median and best images, the problems, the model with its training curves
and the specs that made it), ``report.json`` (scores, confusion matrix as counts and
percentages, every problem by id), ``confusion_matrix.png`` and ``pairs.parquet`` (counts
and Task 1 scores per pair, to find the worst images).

When ``predictions`` is a lesion-ray predict output, its ``predict.json`` names the model and
the spec, and the model folder's ``training.json`` holds the training curves and spec.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image
from pydantic import Field

from lesion_ray import data, figures, metrics, outputs, preprocess, report, report_page, storage
from lesion_ray.settings import Settings
from lesion_ray.spec import InputUri, JobSpec, OutputUri

# Statuses of a scoring pair; all but "bad_truth" are scored.
PROBLEMS = ("missing", "unreadable", "wrong_size", "ambiguous", "bad_truth")
REPORT_FILE = "report.json"
FIGURE_FILE = "confusion_matrix.png"
PAIRS_FILE = "pairs.parquet"
PROBLEM_DESCRIPTIONS = {
    "missing": "no prediction file for this ground-truth mask: scored as an all-zero mask",
    "unreadable": "the prediction file is not a readable single-channel image: scored as an all-zero mask",
    "wrong_size": "the prediction's size differs from its ground truth's: scored as an all-zero mask",
    "ambiguous": "several prediction files carry this id: scored as an all-zero mask",
    "bad_truth": "the ground-truth mask could not be read: left out of the scores",
}
EXAMPLES_PER_GROUP = 4  # images shown as the worst, the median and the best
_PREDICTION_NAME = re.compile(
    rf"_(?:segmentation|attribute_(?P<attribute>{'|'.join(data.ATTRIBUTES)}))(?:_prediction)?\.png$",
    re.IGNORECASE,  # as the ground truth's names are matched
)


class EvaluateSpec(JobSpec):
    kind: Literal["evaluate"] = "evaluate"
    predictions: InputUri
    ground_truth: InputUri
    output: OutputUri
    task: Literal[1, 2] = Field(
        1, description="1: lesion masks (thresholded Jaccard); 2: attribute masks (pooled Jaccard)")
    subset: Literal["Training", "Validation", "Test"] = Field(
        "Validation", description="which subset's ground truth to score when ground_truth is an ISIC root")
    batch_size: int = Field(16, ge=1, description="mask pairs per Ray Data task")


SPEC = EvaluateSpec


def index_predictions(uri: str) -> dict[tuple[str, str], list[str]]:
    """(id, "segmentation" or attribute name) -> prediction URIs, from one listing of ``uri``."""
    found: dict[tuple[str, str], list[str]] = {}
    for info in storage.list_files(uri, (".png",)):
        match = _PREDICTION_NAME.search(storage.basename(info.uri))
        if match:
            key = (data.sample_id(info.uri), (match["attribute"] or "segmentation").lower())
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
    rows = storage.concurrently(_score_pair, [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))])
    counts = np.stack([r[2] for r in rows]) if rows else np.zeros((0, 4), np.int64)
    out = {k: np.asarray(batch[k]) for k in ("id", "attribute", "prediction")}
    out.update(status=np.array([r[0] for r in rows]), detail=np.array([r[1] for r in rows]),
               pixels=np.array([r[3] for r in rows], dtype=np.int64))
    out.update({name: counts[:, i] for i, name in enumerate(metrics.COUNTS)})
    return out


def find_predict_record(predictions: str) -> dict[str, Any] | None:
    """The ``predict.json`` of the predict run whose output is ``predictions`` (or its ``masks/``)."""
    folder = storage.normalize(predictions)
    candidates = [folder, storage.parent(folder)] if storage.basename(folder) == outputs.MASKS_DIR else [folder]
    for candidate in candidates:
        uri = storage.join(candidate, outputs.PREDICT_RECORD)
        if storage.exists(uri):
            return json.loads(storage.read_text(uri))
    return None


def pick_examples(scores: np.ndarray, per_group: int = EXAMPLES_PER_GROUP) -> list[tuple[str, list[int]]]:
    """(title, indices) of the worst, median and best images by score; all of them when few."""
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    if len(order) <= 3 * per_group:
        return [("All images, worst first", order)] if order else []
    middle = len(order) // 2 - per_group // 2
    return [("Worst", order[:per_group]), ("Median", order[middle:middle + per_group]),
            ("Best", order[::-1][:per_group])]


def _per_image(table: pa.Table, scored: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Image ids and each image's Jaccard, its masks' pixel counts summed (Task 2: over attributes)."""
    ids = table["id"].to_numpy(zero_copy_only=False)[scored]
    unique, inverse = np.unique(ids, return_inverse=True)
    counts = np.zeros((len(unique), len(metrics.COUNTS)), np.int64)
    np.add.at(counts, inverse, np.stack([table[name].to_numpy()[scored] for name in metrics.COUNTS], axis=1))
    return unique.tolist(), metrics.jaccard(counts)


def _read_binary(uri: str) -> np.ndarray | None:
    try:
        return metrics.binarize(read_mask(uri))
    except (ValueError, storage.StorageError):
        return None


def _tile(items: list[dict[str, Any]], image_uri: str | None) -> tuple[bytes, str]:
    """One image's comparison tile (:func:`figures.comparison_tile`) from its scoring pairs (Task 2: one per
    attribute, drawn together), and a note on what it lacks."""
    truths = [mask for mask in map(_read_binary, (item["truth"] for item in items)) if mask is not None]
    truth = np.logical_or.reduce([mask for mask in truths if mask.shape == truths[0].shape])
    prediction = np.zeros_like(truth)
    for item in items:
        mask = _read_binary(item["prediction"]) if item["status"] == "ok" else None
        if mask is not None and mask.shape == truth.shape:  # unreadable or wrongly sized: drawn as empty
            prediction |= mask
    picture, note = None, "image not found"
    if image_uri:
        with contextlib.suppress(preprocess.BadImage, storage.StorageError):
            picture, _ = preprocess.decode_image(storage.read_bytes(image_uri), target=figures.TILE_HEIGHT)
            note = ""
    return figures.comparison_tile(picture, truth, prediction), note


def _image_sources(record: dict[str, Any] | None, truth: dict[str, dict[str, str]], subset: str,
                   ids: list[str]) -> dict[str, str]:
    """Where the input images of ``ids`` lie: the predict manifest's sources, else the ISIC input folder
    beside the ground truth."""
    if record and record.get("manifest") and storage.exists(record["manifest"]):
        manifest = pq.read_table(io.BytesIO(storage.read_bytes(record["manifest"])),
                                 columns=["id", "source", "status"])
        manifest = manifest.filter(pc.is_in(manifest["id"], pa.array(ids))).to_pylist()
        # An id's ok row where it has one: a duplicate's error row names the same id.
        return {r["id"]: r["source"] for r in sorted(manifest, key=lambda r: r["status"] == "ok")}
    found = {}
    for image_id in ids:
        truth_folder = storage.parent(next(iter(truth[image_id].values())))
        uri = storage.join(storage.parent(truth_folder), f"ISIC2018_Task1-2_{subset}_Input", f"{image_id}.jpg")
        if storage.exists(uri):
            found[image_id] = uri
    return found


def example_groups(table: pa.Table, scored: np.ndarray, truth: dict[str, dict[str, str]],
                   record: dict[str, Any] | None, subset: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """The report's tiles: the worst, median and best images by per-image Jaccard."""
    ids, scores = _per_image(table, scored)
    groups = pick_examples(scores)
    chosen = sorted({ids[i] for _, indices in groups for i in indices})
    sources = _image_sources(record, truth, subset, chosen)
    by_id: dict[str, list[dict[str, Any]]] = {}
    rows = table.filter(pc.is_in(table["id"], pa.array(chosen, pa.string())))
    for row in rows.select(["id", "attribute", "prediction", "status"]).to_pylist():
        by_id.setdefault(row["id"], []).append({**row, "truth": truth[row["id"]][row["attribute"]]})
    tiles = {}
    for image_id in chosen:
        picture, note = _tile(by_id[image_id], sources.get(image_id))
        tiles[image_id] = {"id": image_id, "image": picture, "note": note}
    return [(title, [{**tiles[ids[i]], "jaccard": float(scores[i])} for i in indices]) for title, indices in groups]


def write_page(uri: str, job: EvaluateSpec, result: dict[str, Any], groups: list[tuple[str, list[dict[str, Any]]]],
               record: dict[str, Any] | None) -> None:
    """report.html: scores, confusion matrix, images, problems, model and curves, specs."""
    # Here, in the driver: the scoring tasks' processes never import the registry's torch.
    from lesion_ray import registry

    card = None
    if record:
        with contextlib.suppress(storage.StorageError, ValueError):  # a model moved or deleted since
            card = registry.model_card(record["model"]["uri"])
    training = card["training"] if card else {}
    sections = [report_page.scores_section(result), report_page.confusion_section(result["confusion_matrix"]),
                report_page.examples_section(groups, job.task),
                report_page.problems_section(result, PROBLEM_DESCRIPTIONS)]
    if card:
        settings = [("predicted with threshold", record.get("threshold", "?")),
                    ("post-processing", record.get("postprocess", "?"))]
        sections += [report_page.model_section(card, settings),
                     report_page.curves_section(training.get("history", []), job.task)]
    else:
        why = (f"its folder {record['model']['uri']} could not be read" if record else
               f"the predictions were not made by a lesion-ray predict run (no {outputs.PREDICT_RECORD} in "
               f"{job.predictions})")
        sections.append(report_page.section("Model", f'<p class="muted">Unknown: {report_page.esc(why)}.</p>',
                                            "model"))
    sections.append(report_page.specs_section([("train spec", training.get("spec")),
                                               ("predict spec", record["spec"] if record else None),
                                               ("evaluate spec", job.model_dump(mode="json"))]))
    model = f" · model {report_page.model_name(card)}" if card else ""
    subtitle = f"ISIC 2018 Task {job.task}, {result['images']:,} images{model}"
    storage.write_text(uri, report_page.page(f"Evaluation '{job.name}'", subtitle, sections))


def run(spec: EvaluateSpec, settings: Settings) -> dict[str, Any]:
    truth = data.discover_ground_truth(spec.ground_truth, spec.subset, spec.task)  # raises when there is none
    predictions = index_predictions(spec.predictions)
    items = pair_items(truth, predictions)
    extra = len(set(predictions) - {(item["id"], item["attribute"]) for item in items})
    report.info(f"scoring {len(items)} masks of {len(truth)} images; {len(predictions)} predictions found")

    ds = ray.data.from_items(items).map_batches(score_batch, batch_size=spec.batch_size, compute=preprocess.task_pool())
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
    for name, values in metrics.image_scores(counts).items():  # NaN where nothing was scored (a problem row)
        table = table.append_column(name, pa.array(np.where(scored, values, np.nan)))

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
    storage.write_bytes(storage.join(out, FIGURE_FILE), figures.confusion_figure(cm, title))
    with storage.open_write(storage.join(out, PAIRS_FILE)) as f:
        pq.write_table(table, f)
    page_uri = storage.join(out, report_page.PAGE_FILE)
    try:
        record = find_predict_record(spec.predictions)
        write_page(page_uri, spec, result, example_groups(table, scored, truth, record, spec.subset), record)
    except (ValueError, KeyError, TypeError, storage.StorageError) as exc:
        # The scores are written: a page that cannot be made (a damaged predict.json, masks changed meanwhile)
        # must not fail the evaluation.
        report.info(f"warning: {page_uri} not written ({type(exc).__name__}: {exc}); the scores are in report.json")
        page_uri = "none"

    summary: dict[str, Any] = {"task": spec.task, "images": len(truth), "masks": len(items)}
    summary.update({k: v for k, v in scores.items() if k != "per_attribute"})
    summary["problems"] = result["problem_counts"]
    summary.update(report=page_uri, scores_json=storage.join(out, REPORT_FILE))
    return summary
