"""The synthetic ISIC generator: spec, layout, mask values and shapes, determinism, attribute rates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesion_ray import data, spec, storage, synth


def _grow(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Flood fill: every ``allowed`` pixel 4-connected to ``seed``."""
    reached = seed & allowed
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= allowed
        if (grown == reached).all():
            return reached
        reached = grown


def _one_region_without_holes(mask: np.ndarray) -> bool:
    start = np.zeros_like(mask)
    start[tuple(np.argwhere(mask)[0])] = True
    border = np.ones_like(mask)
    border[1:-1, 1:-1] = False
    outside = _grow(border, ~mask)  # background reachable from the border; anything else is a hole
    return bool((_grow(start, mask) == mask).all() and (outside | mask).all())


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))))


def _synth(output: str, **keys) -> synth.SynthSpec:
    raw = {"kind": "synth", "name": "synth", "output": output, "width": [48, 72], "seed": 5} | keys
    return spec.parse(raw, "test.yaml")


def test_spec_defaults_checks_and_example_file() -> None:
    parsed = _synth("runs/x")
    assert parsed.tasks == [1, 2] and parsed.aspect == (0.66, 0.75) and parsed.validation_images == 20
    for bad, message in [
        ({"width": [400, 300]}, "width: expected \\[low, high\\]"),
        ({"tasks": []}, r"tasks: expected \[1\], \[2\] or \[1, 2\]"),
        ({"tasks": [3]}, "tasks\\[0\\]: expected one of 1, 2"),
        ({"num_imgs": 3}, "num_imgs: unknown key \\(did you mean 'num_images'\\?\\)"),
    ]:
        with pytest.raises(spec.SpecError, match=message):
            _synth("runs/x", **bad)
    example = spec.load(str(Path(__file__).parents[1] / "jobs" / "synth.yaml"))
    assert isinstance(example, synth.SynthSpec) and example.output.endswith("runs/synth/isic")


@pytest.fixture(scope="module")
def generated(ray_local, settings, tmp_path_factory) -> tuple[str, dict]:
    output = str(tmp_path_factory.mktemp("synth") / "isic")
    return output, synth.run(_synth(output, num_images=10, validation_images=4), settings)


def test_run_writes_the_isic_layout(generated) -> None:
    output, summary = generated
    assert summary["training_images"] == 10 and summary["validation_images"] == 4
    assert summary["files"] == 14 * (1 + 1 + len(data.ATTRIBUTES))
    training = data.discover(output, "Training", task=2)
    validation = data.discover(output, "Validation", task=1)
    assert len(training.samples) == 10 and len(validation.samples) == 4
    assert training.problems == [] and validation.problems == []
    assert "ISIC2018_Task2_Training_GroundTruth_v3" in training.samples[0].attributes["streaks"]
    assert len(data.discover_ground_truth(output, "Validation", task=2)) == 4


def test_masks_are_binary_sized_contiguous_and_inside_the_lesion(generated) -> None:
    output, _ = generated
    for sample in data.discover(output, "Training", task=2).samples:
        image = _decode(sample.image)
        height, width, _ = image.shape
        assert 48 <= width <= 72 and 0.66 <= height / width <= 0.76
        lesion = _decode(sample.segmentation)
        assert lesion.shape == (height, width) and set(np.unique(lesion)) == {0, 255}
        assert _one_region_without_holes(lesion > 0)
        for name, uri in sample.attributes.items():
            mask = _decode(uri)
            assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}, name
            assert not (mask & ~lesion).any(), f"{name} outside the lesion"
        assert image[lesion > 0].mean() < image[lesion == 0].mean()  # the lesion is darker than skin


def test_same_seed_same_data_on_any_storage(generated, settings, s3_bucket: str) -> None:
    output, _ = generated
    again = f"{s3_bucket}/isic"
    synth.run(_synth(again, num_images=3, validation_images=0, tasks=[1]), settings)
    names = [f.uri.removeprefix(again) for f in storage.list_files(again)]
    assert len(names) == 6 and not any("Task2" in n for n in names)
    for name in names:
        assert storage.read_bytes(again + name) == storage.read_bytes(output + name), name
    other = synth.render(_synth(output, seed=6), 0)
    assert not np.array_equal(other.image, synth.render(_synth(output), 0).image)


def test_attribute_masks_are_empty_at_the_isic_rates() -> None:
    config = _synth("unused", width=[40, 48], max_hairs=0)
    n = 400
    non_empty = dict.fromkeys(data.ATTRIBUTES, 0)
    for index in range(n):
        for name, mask in synth.render(config, index).attributes.items():
            non_empty[name] += bool(mask.any())
    for name, rate in synth.ATTRIBUTE_RATES.items():
        assert abs(non_empty[name] / n - rate) < 0.08, (name, non_empty[name] / n, rate)
    assert non_empty["pigment_network"] > non_empty["milia_like_cyst"] > non_empty["streaks"]
