"""The `lesion-ray` command: every example spec validates, bad specs fail clearly, jobs run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lesion_ray import cli, registry, storage
from lesion_ray.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A checkout-like folder with what the examples read: the quickstart's outputs."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "cluster", tmp_path / "cluster")
    for folder in ("runs/quickstart/data/ISIC2018_Task1-2_Validation_Input", "runs/synth/isic", "runs/predict"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = ModelConfig(architecture="unet", task=1, input_size=32, num_filters=4, depth=2)
    model_dir = str(tmp_path / "model")
    registry.save_model_dir(model_dir, registry.plain_state_dict(build_model(config)),
                            registry.config_to_json(config, 0.5))
    registry.publish(model_dir, "quickstart-unet", {"val_score": 0.5}, str(tmp_path / "runs" / "registry"))
    return tmp_path


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_validates(workdir: Path, example: str, capsys) -> None:
    assert cli.main(["validate", f"jobs/{example}"]) == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out


BAD = [
    ("synth.yaml", ["num_images=0"], "num_images: must be at least 1"),
    ("synth.yaml", ["width=[500, 100]"], "width: expected [low, high], got [500, 100]"),
    ("synth.yaml", ["seeds=3"], "seeds: unknown key (did you mean 'seed'?)"),
    ("train.yaml", ["epochs=zero"], "epochs: expected an integer"),
    ("train.yaml", ["model.architecture=vgg"], "model.architecture: expected one of"),
    ("train.yaml", ["data=runs/nowhere"], "data: nothing found"),
    ("train.yaml", ["output=s3://no-such-bucket-lr/x"], "output: bucket 'no-such-bucket-lr' does not exist"),
    ("train.yaml", ["num_workers=[3, 1]"], "num_workers: [min, max] needs min <= max, got [3, 1]"),
    ("predict.yaml", ["batch_size=0"], "batch_size: must be at least 1"),
    ("predict.yaml", ["model=no-such-model@latest"], "model: model 'no-such-model' is not in the registry"),
    ("evaluate.yaml", ["task=3"], "task: expected one of 1, 2"),
    ("evaluate.yaml", ["predictions=runs/nothing-here"], "predictions: nothing found"),
    ("serve.yaml", ["port=70000"], "port: must be at most 65535"),
    ("serve.yaml", ["max_batch_size=0"], "max_batch_size: must be at least 1"),
    ("quickstart.yaml", ["steps.train.epochs=-1"], "steps[1].epochs: must be at least 1"),
    ("quickstart.yaml", ["steps.predict.model=${nowhere.model_name}@latest"], "names no earlier step"),
    ("quickstart.yaml", ["steps.evaluate.kind=serve"], "steps[3].kind: a pipeline step cannot be"),
]


@pytest.mark.parametrize(("example", "overrides", "message"), BAD)
def test_bad_specs_exit_2_naming_the_key(workdir: Path, example: str, overrides: list[str],
                                         message: str, capsys) -> None:
    assert cli.main(["validate", f"jobs/{example}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: jobs/{example}: ")
    assert message in err
    assert "Traceback" not in err


def test_pipeline_steps_from_files_with_references(workdir: Path) -> None:
    pipeline = {
        "kind": "pipeline",
        "name": "chain",
        "steps": [
            {"file": "synth.yaml", "name": "make", "num_images": 7},
            {"file": "train.yaml", "data": "${make.output}", "epochs": "${make.num_images}"},
        ],
    }
    (workdir / "jobs" / "chain.yaml").write_text(yaml.safe_dump(pipeline))
    from lesion_ray import spec

    job = spec.load("jobs/chain.yaml")
    synth, train = job.jobs
    assert synth.num_images == 7 and synth.seed == 0  # the file's keys, with the step's override
    assert train.data == synth.output == storage.normalize("runs/synth/isic")
    assert train.epochs == 7 and isinstance(train.epochs, int)  # a whole-value reference keeps its type
    assert cli.main(["validate", "jobs/chain.yaml"]) == 0  # train's data will be made by step one


def test_run_prints_a_summary(workdir: Path, ray_local, capsys) -> None:
    assert cli.main(["run", "jobs/synth.yaml", "num_images=3", "validation_images=1", "output=runs/tiny"]) == 0
    out = capsys.readouterr().out
    assert "synth 'synth' finished in" in out
    assert len(storage.list_files("runs/tiny", suffixes=(".jpg",))) == 4


def test_run_on_kuberay_says_the_kubectl_command_with_the_overrides(workdir: Path, capsys) -> None:
    assert cli.main(["run", "jobs/synth.yaml", "--cluster", "cluster/kuberay.yaml", "num_images=8"]) == 2
    assert "lesion-ray render jobs/synth.yaml --cluster cluster/kuberay.yaml num_images=8 | kubectl apply -f -" \
        in capsys.readouterr().err


def test_unknown_arguments_and_missing_files(workdir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as unknown:
        cli.main(["validate", "jobs/synth.yaml", "--frobnicate"])
    assert unknown.value.code == 2
    assert cli.main(["validate", "jobs/nope.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err
