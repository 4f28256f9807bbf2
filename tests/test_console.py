"""What a user sees: the main job run as the README's first command runs it (a subprocess, no terminal),
at a smaller size. Only lesion-ray's lines on the console; Ray's go to the log file the summary names."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lines of Ray's loggers ("2026-01-01 10:00:00,000\tINFO worker.py:1 -- ...") and of its workers' output.
RAY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR|DEBUG) |\(\w+ pid=|\(raylet\)")
RAY_NOISE = ("Failed to query", "TrainingReport(", "core_worker", "constructor arguments")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "cluster", tmp_path / "cluster")
    return tmp_path


def _run(workdir: Path, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "lesion_ray.cli", "run", *args], cwd=workdir, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout.splitlines()


def test_the_main_job_prints_only_lesion_rays_lines(workdir: Path) -> None:
    lines = _run(workdir, "jobs/quickstart.yaml", "steps.synth.num_images=32", "steps.synth.validation_images=6",
                 "steps.synth.width=[96,128]", "steps.train.epochs=2")
    text = "\n".join(lines)
    assert len(lines) <= 60, text
    assert not [line for line in lines if RAY_LINE.search(line)], text
    assert not [noise for noise in RAY_NOISE if noise in text], text
    epochs = [line for line in lines if re.search(r"epoch \d+/2:", line)]
    assert [line.split(":")[0] for line in epochs] == ["[lesion-ray] epoch 1/2", "[lesion-ray] epoch 2/2"], text

    log_file = workdir / "runs" / "quickstart" / "lesion-ray.log"
    assert re.search(rf"^\s+log\s+: {re.escape(str(log_file))}$", text, re.MULTILINE), text
    log = log_file.read_text()
    assert "Starting execution of Dataset" in log  # Ray Data's INFO lines
    assert "(RayTrainWorker pid=" in log  # the Train workers' output
    assert "Failed to query Ray Train Controller" not in log  # fixed, not hidden


def test_verbose_shows_rays_lines_too(workdir: Path) -> None:
    lines = _run(workdir, "jobs/synth.yaml", "num_images=3", "validation_images=1", "output=runs/tiny", "--verbose")
    assert [line for line in lines if RAY_LINE.search(line)], "\n".join(lines)
    assert (workdir / "runs" / "synth" / "lesion-ray.log").read_text().count("Starting execution of Dataset") == 1
