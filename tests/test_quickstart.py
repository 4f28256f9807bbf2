"""The main job, as the README's first command runs it, at a smaller size: synth -> train -> predict -> evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from lesion_ray import cli

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_pipeline_end_to_end(tmp_path, monkeypatch, ray_local, capsys) -> None:
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "cluster", tmp_path / "cluster")
    monkeypatch.chdir(tmp_path)
    status = cli.main(["run", "jobs/quickstart.yaml", "steps.synth.num_images=32", "steps.synth.validation_images=6",
                       "steps.synth.width=[96, 128]", "steps.train.epochs=2"])
    out = capsys.readouterr().out
    assert status == 0
    assert "pipeline 'quickstart' finished in" in out
    for step in ("synth (synth)", "train (train)", "predict (predict)", "evaluate (evaluate)"):
        assert step in out

    runs = tmp_path / "runs"
    assert (runs / "registry" / "quickstart-unet" / "latest.json").exists()
    masks = sorted((runs / "quickstart" / "predictions" / "masks").glob("ISIC_*_segmentation.png"))
    assert len(masks) == 6
    inputs = runs / "quickstart" / "data" / "ISIC2018_Task1-2_Validation_Input"
    for mask in masks:
        image_id = mask.name.removesuffix("_segmentation.png")
        assert Image.open(mask).size == Image.open(inputs / f"{image_id}.jpg").size  # the original size
    manifest = pq.read_table(runs / "quickstart" / "predictions" / "manifest.parquet").to_pylist()
    assert sorted(row["status"] for row in manifest) == ["ok"] * 6
    report = json.loads((runs / "quickstart" / "evaluation" / "report.json").read_text())
    assert report["images"] == 6
    assert 0.0 <= report["scores"]["jaccard"] <= 1.0
