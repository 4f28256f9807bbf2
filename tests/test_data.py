"""Discovery of ISIC layouts and plain folders (local and S3), pairing reports, splits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lesion_ray import data, storage

INPUT, TASK1, TASK2 = (
    "ISIC2018_Task1-2_Training_Input",
    "ISIC2018_Task1_Training_GroundTruth",
    "ISIC2018_Task2_Training_GroundTruth_v3",
)


def _layout(root: str, n: int, *, task2: bool = True) -> list[str]:
    """Names of an ISIC training layout with ``n`` images where image 1 lacks its Task 1 mask,
    image 2 lacks its streaks mask, and mask 9999999 has no image."""
    names = [f"{INPUT}/ATTRIBUTION.txt"]
    for i in range(n):
        names.append(f"{INPUT}/ISIC_{i:07d}.jpg")
        if i != 1:
            names.append(f"{TASK1}/ISIC_{i:07d}_segmentation.png")
        if task2:
            names += [f"{TASK2}/ISIC_{i:07d}_attribute_{a}.png" for a in data.ATTRIBUTES if (i, a) != (2, "streaks")]
    names.append(f"{TASK1}/ISIC_9999999_segmentation.png")
    _write_all([storage.join(root, name) for name in names])
    return names


def _write_all(uris: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda uri: storage.write_bytes(uri, b"x"), uris))


def _reasons(found: data.Discovery) -> dict[str, str]:
    return {p.id: p.reason for p in found.problems}


def test_discover_pairs_task1_and_reports_problems(tmp_path) -> None:
    root = str(tmp_path / "isic")
    _layout(root, 5)
    found = data.discover(root, task=1)
    assert [s.id for s in found.samples] == ["ISIC_0000000", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
    first = found.samples[0]
    assert first.image == storage.join(root, INPUT, "ISIC_0000000.jpg")
    assert first.segmentation == storage.join(root, TASK1, "ISIC_0000000_segmentation.png")
    assert sorted(first.attributes) == sorted(data.ATTRIBUTES)
    assert found.samples[1].attributes is None  # image 2 has only four of five Task 2 masks
    reasons = _reasons(found)
    assert reasons["ISIC_0000001"] == "image without Task 1 mask"
    assert reasons["ISIC_9999999"] == "mask without image"
    assert reasons["ATTRIBUTION"] == "not an image file (ignored)"
    summary = found.summary()
    assert "4 usable samples, 3 problems" in summary
    assert "1 x mask without image (e.g. ISIC_9999999_segmentation.png)" in summary


def test_discover_task2_needs_all_five_masks(tmp_path) -> None:
    root = str(tmp_path / "isic")
    _layout(root, 4)
    found = data.discover(root, task=2)
    assert [s.id for s in found.samples] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]
    assert _reasons(found)["ISIC_0000002"] == "image without all Task 2 masks: missing streaks"
    everything = data.discover(root)
    assert len(everything.samples) == 4 and everything.samples[1].segmentation is None


def test_discover_input_folder_plain_folder_and_mistakes(tmp_path) -> None:
    root = str(tmp_path / "isic")
    _layout(root, 3, task2=False)
    from_input = data.discover(storage.join(root, INPUT), task=1)
    assert [s.id for s in from_input.samples] == ["ISIC_0000000", "ISIC_0000002"]
    assert from_input.samples[0].segmentation.endswith("ISIC_0000000_segmentation.png")

    plain = str(tmp_path / "photos")
    _write_all([f"{plain}/a/mole.JPG", f"{plain}/b/ISIC_0000042_downsampled.jpg", f"{plain}/notes.txt"])
    found = data.discover(plain)
    assert [(s.id, s.segmentation) for s in found.samples] == [("ISIC_0000042", None), ("mole", None)]
    assert _reasons(found) == {"notes": "not an image file (ignored)"}

    with pytest.raises(ValueError, match="not an ISIC 2018 layout"):
        data.discover(plain, task=1)
    with pytest.raises(ValueError, match="no Task 2 ground truth .* ISIC2018_Task2_Training_GroundTruth"):
        data.discover(root, task=2)
    with pytest.raises(ValueError, match="no Validation images .* subsets Training"):
        data.discover(root, subset="Validation")
    with pytest.raises(ValueError, match="no images"):
        data.discover(str(tmp_path / "isic" / TASK1))


def test_discover_ground_truth_from_root_or_folder(tmp_path) -> None:
    root = str(tmp_path / "isic")
    _layout(root, 3)
    truth = data.discover_ground_truth(root, "Training", task=1)
    assert sorted(truth) == ["ISIC_0000000", "ISIC_0000002", "ISIC_9999999"]
    assert truth["ISIC_0000000"] == {"segmentation": storage.join(root, TASK1, "ISIC_0000000_segmentation.png")}
    assert data.discover_ground_truth(storage.join(root, TASK1), task=1) == truth
    attributes = data.discover_ground_truth(root, "Training", task=2)
    assert sorted(attributes["ISIC_0000001"]) == sorted(data.ATTRIBUTES) and len(attributes["ISIC_0000002"]) == 4
    with pytest.raises(ValueError, match="no Validation Task 1 masks .* subsets Training"):
        data.discover_ground_truth(root, "Validation", task=1)
    with pytest.raises(ValueError, match="no Task 1 masks"):
        data.discover_ground_truth(storage.join(root, INPUT), task=1)


def test_discover_on_s3_with_more_than_1000_objects(s3_bucket: str) -> None:
    root = f"{s3_bucket}/archive/isic"
    names = _layout(root, 500, task2=False)  # 1 + 500 images + 499 + 1 masks: two listing pages
    assert len(names) == 1001
    found = data.discover(root, task=1)
    assert len(found.samples) == 499 and found.samples[-1].image == f"{root}/{INPUT}/ISIC_0000499.jpg"
    assert found.samples[-1].segmentation == f"{root}/{TASK1}/ISIC_0000499_segmentation.png"
    assert sorted(p.id for p in found.problems) == ["ATTRIBUTION", "ISIC_0000001", "ISIC_9999999"]
    assert len(data.discover(f"{root}/{INPUT}").samples) == 500


def _samples(n: int) -> list[data.Sample]:
    return [data.Sample(f"ISIC_{i:07d}", f"/x/ISIC_{i:07d}.jpg") for i in range(n)]


def test_split_is_seeded_and_independent_of_order() -> None:
    samples = _samples(100)
    first = data.split_samples(samples, 0.2, seed=7)
    assert len(first["train"]) == 80 and len(first["validation"]) == 20
    assert data.split_samples(list(reversed(samples)), 0.2, seed=7) == first
    assert data.split_samples(samples, 0.2, seed=8)["validation"] != first["validation"]
    assert {s.id for s in first["train"]}.isdisjoint(s.id for s in first["validation"])
    tiny = data.split_samples(samples[:3], 0.1)
    assert (len(tiny["train"]), len(tiny["validation"])) == (2, 1)


def test_split_csv_round_trip_and_errors(tmp_path) -> None:
    samples = _samples(10)
    splits = data.split_samples(samples, 0.3, seed=1)
    uri = str(tmp_path / "run" / "split.csv")
    data.write_split(splits, uri)
    assert storage.read_text(uri).splitlines()[0] == "id,split"
    assert data.split_samples(samples, seed=99, split_csv=uri) == splits
    with pytest.raises(ValueError, match="1 samples are not in"):
        data.split_samples(_samples(11), split_csv=uri)
    storage.write_text(uri, "id,split\nISIC_0000000,test\n")
    with pytest.raises(ValueError, match="line 2: expected <id>,train or <id>,validation"):
        data.split_samples(samples[:1], split_csv=uri)
