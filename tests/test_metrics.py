"""Every official score against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lesion_ray import metrics

# truth      prediction
# X X . .    X . . .
# X X . .    X X X .
TRUTH = np.array([[255, 255, 0, 0], [255, 255, 0, 0]], dtype=np.uint8)
PRED = np.array([[255, 0, 0, 0], [255, 255, 255, 0]], dtype=np.uint8)


def test_pixel_counts_by_hand() -> None:
    # TP (0,0) (1,0) (1,1); FP (1,2); FN (0,1); TN the other three.
    assert metrics.pixel_counts(TRUTH, PRED).tolist() == [3, 1, 1, 3]


def test_binarisation_is_strictly_above_128() -> None:
    truth = np.array([[128, 129]], dtype=np.uint8)
    pred = np.array([[129, 128]], dtype=np.uint8)
    # truth positive only at (0,1); prediction positive only at (0,0).
    assert metrics.pixel_counts(truth, pred).tolist() == [0, 1, 1, 0]


def test_missing_prediction_scores_as_all_zero() -> None:
    assert metrics.pixel_counts(TRUTH, None).tolist() == [0, 0, 4, 4]


def test_wrong_size_prediction_raises() -> None:
    with pytest.raises(ValueError, match="prediction is 2x2, ground truth is 4x2"):
        metrics.pixel_counts(TRUTH, np.zeros((2, 2), np.uint8))


def test_per_image_scores_by_hand() -> None:
    scores = metrics.image_scores(np.array([[3, 1, 1, 3]]))
    assert scores["jaccard"][0] == pytest.approx(3 / 5)
    assert scores["threshold_jaccard"][0] == 0.0  # 0.6 < 0.65
    assert scores["dice"][0] == pytest.approx(6 / 8)
    assert scores["sensitivity"][0] == pytest.approx(3 / 4)
    assert scores["specificity"][0] == pytest.approx(3 / 4)
    assert scores["accuracy"][0] == pytest.approx(6 / 8)


def test_threshold_keeps_jaccard_at_the_floor() -> None:
    # J = 13/20 = 0.65 exactly: kept (the official rule is "< 0.65 counts as 0").
    assert metrics.threshold_jaccard(np.array([13, 7, 0, 0]))[()] == pytest.approx(0.65)


def test_empty_cases_follow_the_official_freebies() -> None:
    empty_both = metrics.image_scores(np.array([[0, 0, 0, 8]]))
    assert {k: float(v[0]) for k, v in empty_both.items()} == dict.fromkeys(metrics.TASK1_SCORES, 1.0)
    # Empty ground truth, two false positives: Jaccard/Dice 0, sensitivity a freebie.
    false_alarm = metrics.image_scores(np.array([[0, 2, 0, 6]]))
    assert false_alarm["jaccard"][0] == 0.0
    assert false_alarm["dice"][0] == 0.0
    assert false_alarm["sensitivity"][0] == 1.0
    assert false_alarm["specificity"][0] == pytest.approx(6 / 8)
    # All-lesion ground truth predicted perfectly: specificity a freebie.
    assert metrics.specificity(np.array([4, 0, 0, 0]))[()] == 1.0


def test_task1_is_the_mean_over_images() -> None:
    scores = metrics.task1_scores(np.array([[3, 1, 1, 3], [4, 0, 0, 4]]))
    assert scores["threshold_jaccard"] == pytest.approx((0 + 1) / 2)
    assert scores["jaccard"] == pytest.approx((0.6 + 1) / 2)
    assert scores["dice"] == pytest.approx((0.75 + 1) / 2)
    assert scores["accuracy"] == pytest.approx((0.75 + 1) / 2)
    with pytest.raises(ValueError, match="no images"):
        metrics.task1_scores(np.zeros((0, 4)))


def test_task2_pools_normalised_counts_over_images_and_attributes() -> None:
    counts = np.array([
        [2, 0, 2, 0],  # image 1 (4 px), streaks: /4 -> .5 0 .5
        [0, 4, 0, 4],  # image 2 (8 px), streaks: /8 -> 0 .5 0
        [1, 1, 0, 2],  # image 1 (4 px), globules: /4 -> .25 .25 0
    ])
    scores = metrics.task2_scores(counts, [4, 8, 4], ["streaks", "streaks", "globules"])
    # Pooled: TP .75, FP .75, FN .5.
    assert scores["jaccard"] == pytest.approx(0.75 / 2.0)
    assert scores["dice"] == pytest.approx(1.5 / 2.75)
    assert scores["per_attribute"]["streaks"] == pytest.approx({"jaccard": 0.5 / 1.5, "dice": 1.0 / 2.0})
    assert scores["per_attribute"]["globules"] == pytest.approx({"jaccard": 0.25 / 0.5, "dice": 0.5 / 0.75})
    # Pooled is not the mean of the per-attribute scores.
    assert scores["jaccard"] != pytest.approx((1 / 3 + 1 / 2) / 2)


def test_task2_all_empty_is_perfect() -> None:
    scores = metrics.task2_scores(np.array([[0, 0, 0, 4]]), [4], ["streaks"])
    assert scores["jaccard"] == 1.0 and scores["dice"] == 1.0


def test_confusion_matrix_counts_and_row_percentages() -> None:
    cm = metrics.confusion_matrix(np.array([[3, 1, 1, 3], [4, 0, 0, 4]]))
    # Rows: truth (not lesion, lesion); columns: prediction.
    assert cm["counts"] == [[7, 1], [1, 7]]
    assert cm["percent"] == [[87.5, 12.5], [12.5, 87.5]]
    assert cm["labels"] == ["not lesion", "lesion"]
    # No positive pixels in the ground truth: that row is all zero, not NaN.
    assert metrics.confusion_matrix(np.array([0, 2, 0, 6]))["percent"] == [[75.0, 25.0], [0.0, 0.0]]
