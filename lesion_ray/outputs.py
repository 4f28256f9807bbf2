"""Predict's writing stage (CPU tasks): probabilities -> the ISIC submission files (``masks/<id>_segmentation.png``
or ``masks/<id>_attribute_<name>.png``), optionally ``overlays/<id>_overlay.png``, and one manifest row per
image, errors included, written as a manifest part. numpy, PIL and pyarrow only: the writing tasks' processes
never import torch.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from lesion_ray import data, manifest, preprocess, storage
from lesion_ray.postprocess import OVERLAY_HEIGHT, Postprocess, mask_png, overlay_png, to_masks

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
PREDICT_RECORD = "predict.json"  # the spec, the model and its settings: evaluate reads it


def mask_names(image_id: str, task: int) -> list[str]:
    """The ISIC submission file names of one image's masks."""
    if task == 1:
        return [f"{image_id}_segmentation.png"]
    return [f"{image_id}_attribute_{name}.png" for name in data.ATTRIBUTES]


def _write_one(row: dict[str, Any], out: str, task: int, threshold: float, postprocess: Postprocess,
               overlay: bool, max_pixels: int) -> tuple[list[str], str, list[float]]:
    """Write one image's masks (and overlay); returns (mask URIs, overlay URI, area fractions)."""
    masks = to_masks(row["probs"], int(row["orig_height"]), int(row["orig_width"]), threshold, postprocess)
    uris = [storage.join(out, MASKS_DIR, name) for name in mask_names(str(row["id"]), task)]
    for uri, mask in zip(uris, masks, strict=True):
        storage.write_bytes(uri, mask_png(mask))
    overlay_uri = ""
    if overlay:
        image, _ = preprocess.decode_image(storage.read_bytes(str(row["source"])), max_pixels=max_pixels,
                                           target=OVERLAY_HEIGHT)
        overlay_uri = storage.join(out, OVERLAYS_DIR, f"{row['id']}_overlay.png")
        storage.write_bytes(overlay_uri, overlay_png(image, masks))
    return uris, overlay_uri, [float(m.mean()) for m in masks]


def write_batch(batch: dict[str, np.ndarray], out: str, task: int, threshold: float, postprocess: Postprocess,
                overlay_ids: set[str] | None, model_name: str, model_version: str, max_pixels: int,
                run_id: str) -> pa.Table:
    """Ray Data operator: probabilities -> mask files + one manifest row per image (errors included),
    written as a manifest part; returns ``source``, ``status``, ``error``, ``part`` and ``node`` of each row
    for the driver's ledger and its summary.

    ``overlay_ids``: the images that get an overlay; None for all of them.
    """
    rows = []
    for i in range(len(batch["id"])):
        row = {k: batch[k][i] for k in batch}
        image_id, error = str(row["id"]), str(row["error"])
        start = time.perf_counter()
        uris, overlay_uri, areas = [], "", []
        if not error:
            try:
                overlay = overlay_ids is None or image_id in overlay_ids
                uris, overlay_uri, areas = _write_one(row, out, task, threshold, postprocess, overlay,
                                                      max_pixels)
            except Exception as exc:  # one failed write must not lose the rest of the batch
                error, uris, overlay_uri, areas = f"writing outputs failed: {type(exc).__name__}: {exc}", [], "", []
        rows.append({
            "id": image_id,
            "source": str(row["source"]),
            "status": manifest.ERROR if error else manifest.OK,
            "error": error,
            "masks": uris,
            "overlay": overlay_uri,
            "height": int(row["orig_height"]),
            "width": int(row["orig_width"]),
            "area_fraction": areas,
            "head1_prob": row["head1"].tolist() if not error else [],
            "head2_prob": row["head2"].tolist() if not error else [],
            "model_name": model_name,
            "model_version": model_version,
            "threshold": threshold,
            "postprocess": postprocess,
            "infer_ms": float(row["infer_ms"]),
            "write_ms": 1000 * (time.perf_counter() - start),
            "finished_at": datetime.now(timezone.utc),
            "node": str(row["node"]),
        })
    table = pa.Table.from_pylist(rows, schema=manifest.SCHEMA)
    part = part_uri(out, run_id)
    manifest.write_part(part, table)
    return pa.table({"source": table["source"], "status": table["status"], "error": table["error"],
                     "part": [part] * len(rows), "node": table["node"]})


def part_uri(out: str, run_id: str) -> str:
    # Named by run, so a later run's parts sort after an earlier run's.
    return storage.join(out, manifest.PARTS_DIR, f"part-{run_id}-{uuid.uuid4().hex}.parquet")
