"""kind: evaluate on real Ray: hand-computed Task 1 scores with every kind of bad prediction,
and ground truth copied as predictions (perfect Task 1 and Task 2 scores) on S3."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lesion_ray import data, evaluate, storage
from lesion_ray.spec import from_dict

TRUTH = np.array([[255, 255, 0, 0], [255, 255, 0, 0]], dtype=np.uint8)
PARTIAL = np.array([[255, 0, 0, 0], [255, 255, 255, 0]], dtype=np.uint8)  # TP 3, FP 1, FN 1, TN 3


def png(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask).save(out, format="PNG")
    return out.getvalue()


def make_spec(**keys) -> evaluate.EvaluateSpec:
    return from_dict(evaluate.EvaluateSpec, {"kind": "evaluate", "name": "eval", **keys}, "test")


def test_task1_hand_computed_with_bad_predictions(ray_local, settings, tmp_path) -> None:
    gt = tmp_path / "isic" / "ISIC2018_Task1_Validation_GroundTruth"
    pred = tmp_path / "pred"
    for i in range(1, 6):
        storage.write_bytes(str(gt / f"ISIC_000000{i}_segmentation.png"), png(TRUTH))
    storage.write_bytes(str(pred / "ISIC_0000001_Segmentation.PNG"), png(TRUTH))  # perfect (names in any case)
    storage.write_bytes(str(pred / "ISIC_0000002_segmentation.png"), png(PARTIAL))  # J 0.6
    # ISIC_0000003: missing
    storage.write_bytes(str(pred / "ISIC_0000004_segmentation.png"), png(np.zeros((3, 3), np.uint8)))
    storage.write_bytes(str(pred / "ISIC_0000005_segmentation.png"), b"not a png")
    storage.write_bytes(str(pred / "ISIC_0000009_segmentation.png"), png(TRUTH))  # no ground truth
    storage.write_bytes(str(pred / "ISIC_0000001_overlay.png"), png(TRUTH))  # not a prediction

    out = tmp_path / "eval"
    summary = evaluate.run(make_spec(predictions=str(pred), ground_truth=str(tmp_path / "isic"), output=str(out)),
                           settings)

    # Per image (J, dice, sens, spec, acc): 1: all 1; 2: .6 .75 .75 .75 .75; 3, 4, 5 (empty): 0 0 0 1 .5.
    expected = {"threshold_jaccard": 1 / 5, "jaccard": 1.6 / 5, "dice": 1.75 / 5,
                "sensitivity": 1.75 / 5, "specificity": 4.75 / 5, "accuracy": 3.25 / 5}
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert summary["images"] == 5
    assert summary["problems"] == {"missing": 1, "unreadable": 1, "wrong_size": 1, "ambiguous": 0, "bad_truth": 0}

    result = json.loads((out / evaluate.REPORT_FILE).read_text())
    assert result["scores"] == pytest.approx(expected)
    assert result["confusion_matrix"]["counts"] == [[19, 1], [13, 7]]
    assert result["confusion_matrix"]["percent"] == [[95.0, 5.0], [65.0, 35.0]]
    assert result["extra_predictions"] == 1
    assert [p["id"] for p in result["problems"]["missing"]] == ["ISIC_0000003"]
    assert result["problems"]["wrong_size"][0]["detail"] == "prediction is 3x3, ground truth is 4x2"
    assert result["problems"]["unreadable"][0]["id"] == "ISIC_0000005"

    pairs = pq.read_table(out / evaluate.PAIRS_FILE).to_pydict()
    assert pairs["id"] == [f"ISIC_000000{i}" for i in range(1, 6)]
    assert pairs["jaccard"][:2] == pytest.approx([1.0, 0.6])
    with Image.open(out / evaluate.FIGURE_FILE) as figure:
        assert figure.format == "PNG" and figure.width > 300

    # The page lists each problem with its id and says the predictions came from outside lesion-ray.
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html")
    assert '<p class="bad">3 of 5 masks have a problem.</p>' in page
    for kind, image_id in (("missing: 1", "ISIC_0000003"), ("unreadable: 1", "ISIC_0000005"),
                           ("wrong size: 1", "ISIC_0000004")):
        assert kind in page and f"<td>{image_id}</td>" in page
    assert "prediction is 3x3, ground truth is 4x2" in page
    assert "1 prediction files match no ground-truth mask" in page
    assert "not made by a lesion-ray predict run" in page
    # Five images: all shown, worst first (the three problems score 0, then 0.6, then 1).
    assert page.count("<figure>") == 5 and page.index("ISIC_0000002 · Jaccard 0.600") < page.index(
        "ISIC_0000001 · Jaccard 1.000")
    assert page.count("image not found") == 5  # masks only: no input images beside this ground truth


def test_examples_are_the_worst_median_and_best() -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0, 1.0, 0.55, 0.65])
    groups = dict(evaluate.pick_examples(scores, per_group=2))
    assert [scores[i] for i in groups["Worst"]] == [0.0, 0.1]
    assert [scores[i] for i in groups["Median"]] == [0.5, 0.55]
    assert [scores[i] for i in groups["Best"]] == [1.0, 0.9]
    assert evaluate.pick_examples(scores[:3], per_group=2) == [("All images, worst first", [2, 0, 1])]


def test_perfect_copies_score_one_on_s3(ray_local, settings, s3_bucket) -> None:
    rng = np.random.default_rng(0)
    for i in range(1, 4):
        h, w = 20 + i, 30 + 2 * i  # every image its own size
        lesion = np.zeros((h, w), np.uint8)
        lesion[2 : h - 3, 3 : w - 4 * i] = 255
        for folder in ("gt1", "pred"):
            storage.write_bytes(f"{s3_bucket}/{folder}/ISIC_000000{i}_segmentation.png", png(lesion))
        for k, name in enumerate(data.ATTRIBUTES):
            mask = np.where(rng.random((h, w)) < 0.3, 255, 0).astype(np.uint8) if (i + k) % 2 else 0 * lesion
            for folder in ("gt2", "pred"):
                storage.write_bytes(f"{s3_bucket}/{folder}/ISIC_000000{i}_attribute_{name}.png", png(mask))

    task1 = evaluate.run(make_spec(predictions=f"{s3_bucket}/pred", ground_truth=f"{s3_bucket}/gt1",
                                   output=f"{s3_bucket}/eval1"), settings)
    assert task1["threshold_jaccard"] == 1.0 and task1["dice"] == 1.0 and task1["accuracy"] == 1.0
    assert sum(task1["problems"].values()) == 0

    task2 = evaluate.run(make_spec(predictions=f"{s3_bucket}/pred", ground_truth=f"{s3_bucket}/gt2",
                                   output=f"{s3_bucket}/eval2", task=2), settings)
    assert task2["masks"] == 15 and task2["jaccard"] == 1.0 and task2["dice"] == 1.0
    result = json.loads(storage.read_text(f"{s3_bucket}/eval2/{evaluate.REPORT_FILE}"))
    assert result["scores"]["per_attribute"] == {name: {"jaccard": 1.0, "dice": 1.0} for name in data.ATTRIBUTES}
    assert result["confusion_matrix"]["counts"][0][1] == 0 and result["confusion_matrix"]["counts"][1][0] == 0
    assert storage.exists(f"{s3_bucket}/eval2/{evaluate.FIGURE_FILE}")
    page = storage.read_text(f"{s3_bucket}/eval2/report.html")  # Task 2: per attribute, one tile per image
    assert "pooled Jaccard over images and attributes" in page and page.count("<figure>") == 3
    assert all(f"<tr><td>{name}</td>" in page for name in data.ATTRIBUTES)
