"""Training on Ray Train with 2 CPU workers on generated data: it learns, checkpoints, resumes, publishes."""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from lesion_ray import data, metrics, registry, spec, storage, train
from lesion_ray.augment import AugmentConfig, augment
from lesion_ray.losses import compute_loss
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.spec import CheckContext


@pytest.fixture(scope="module")
def isic(make_isic, tmp_path_factory) -> str:
    return make_isic(str(tmp_path_factory.mktemp("synth") / "isic"))


def _spec(isic: str, output: str, registry_uri: str, **overrides) -> train.TrainSpec:
    raw = {
        "kind": "train", "name": "train", "data": isic, "output": output, "registry": registry_uri,
        "model": {"architecture": "unet", "input_size": 32, "num_filters": 8, "depth": 3},
        "epochs": 12, "batch_size": 8, "lr": 0.01, "num_workers": 2, "model_name": "tiny",
        "augment": {"affine": False}, "mlflow": {"enabled": False},
    }
    return spec.from_dict(train.TrainSpec, raw | overrides, "test")


def tensorboard_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing: length, CRC, event, CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _score(model: torch.nn.Module, spec_: train.TrainSpec, validation: ray.data.Dataset) -> float:
    return train.TrainRecipe(spec_).validate(model.eval(), validation)["val_score"]


@pytest.fixture(scope="module")
def trained(ray_local, settings, isic: str, new_bucket, tmp_path_factory) -> dict[str, Any]:
    """One 12-epoch run into S3, tracked in MLflow, for the tests that read it: its spec, summary, the registry it
    published into and its history as the run left it (a later test resumes it)."""
    folder = tmp_path_factory.mktemp("trained")
    out, reg = f"{new_bucket()}/runs/tiny", str(folder / "registry")
    tracking = {"mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "tiny"}}
    spec_ = _spec(isic, out, reg, **tracking)
    summary = train.run(spec_, settings)
    return {"spec": spec_, "summary": summary, "output": out, "registry": reg, "folder": folder, "tracking": tracking,
            "history": json.loads(storage.read_text(f"{out}/metrics.json"))}


def test_trains_resumes_and_publishes(trained: dict[str, Any], settings, isic: str, tmp_path) -> None:
    spec_, summary, history = trained["spec"], trained["summary"], trained["history"]
    out, reg, tracking = trained["output"], trained["registry"], trained["tracking"]

    assert summary["model"] == "tiny@1" and summary["epochs"] == 12
    assert summary["train_images"] + summary["validation_images"] == 60 and summary["unreadable_images"] == 0
    assert [row["epoch"] for row in history] == list(range(1, 13))
    assert {row["world_size"] for row in history} == {2}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert storage.read_text(f"{out}/metrics.csv").startswith("epoch,train_loss,val_loss,val_score")
    assert Image.open(storage.local_copy(f"{out}/training.png", str(tmp_path))).size == (720, 380)
    # What the run recorded of itself: the registry version, its report page, TensorBoard and MLflow.
    training = json.loads(storage.read_text(f"{reg}/tiny/1/{registry.TRAINING_FILE}"))
    assert training["history"] == history and training["spec"]["model"]["num_filters"] == 8
    page = storage.read_text(summary["report"])
    assert "Training &#x27;train&#x27;" in page and "published tiny@1, 12 epochs" in page
    assert f"validation score <b>{summary['best_val_score']:.4f}</b>" in page
    events = [f for f in storage.list_files(f"{out}/tensorboard") if "tfevents" in f.uri]
    assert len(events) == 1
    scalars = tensorboard_scalars(storage.read_bytes(events[0].uri))
    steps, values = zip(*scalars["score/validation"], strict=True)
    assert steps == tuple(range(1, 13)), steps
    assert values == pytest.approx([row["val_score"] for row in history], abs=1e-6), (values, history)
    assert [step for step, _ in scalars["loss/train"]] == list(range(1, 13))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.params["model.num_filters"] == "8"
    assert run.data.tags["lesion_ray.model"] == "tiny@1"
    assert run.info.artifact_uri.startswith(f"file://{trained['folder']}/mlruns/")  # beside its database, not the cwd
    assert [m.step for m in client.get_metric_history(run.info.run_id, "score/validation")] == list(range(1, 13))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.html", "training.png", "metrics.csv"}

    # The official score on the held-out split: the trained model clears thresholds an untrained one fails.
    samples = data.discover(isic, task=1).samples
    splits = {"validation": data.split_samples(samples, split_csv=f"{out}/split.csv")["validation"]}
    datasets, errors = train.prepare(splits, spec_)
    assert errors == []
    validation = datasets["validation"]
    loaded = registry.load_model("tiny@latest", registry=reg)
    torch.manual_seed(0)
    untrained = _score(build_model(spec_.model), spec_, validation)
    published = _score(loaded.model, spec_, validation)
    assert untrained < 0.2 and published > 0.5, (untrained, published)
    # Same weights and images as the workers scored; only float rounding (thread counts) differs.
    assert published == pytest.approx(summary["best_val_score"], abs=0.01)
    assert loaded.metrics["val_score"] == summary["best_val_score"]

    # Same run, more epochs: resumes from the latest checkpoint in S3 instead of starting over.
    resumed = train.run(_spec(isic, out, reg, epochs=13, **tracking), settings)
    history = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert [row["epoch"] for row in history] == list(range(1, 14))
    assert history[-1]["starts"] == 1 and history[0]["starts"] == 0
    # The same MLflow run goes on; TensorBoard gets a second event file with the new epoch only.
    assert resumed["mlflow_run"] == summary["mlflow_run"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "score/validation")] == list(range(1, 14))
    events = sorted(f.uri for f in storage.list_files(f"{out}/tensorboard") if "tfevents" in f.uri)
    assert len(events) == 2
    assert {step for name in events for step, _ in tensorboard_scalars(storage.read_bytes(name))["loss/train"]} \
        == set(range(1, 14))
    summary = resumed
    # Published once per best checkpoint: a new version only if epoch 13 beat the first 12.
    before, after = max(row["val_score"] for row in history[:12]), history[12]["val_score"]
    assert summary["model"] == ("tiny@2" if after > before else "tiny@1")  # on a tie the earlier epoch stays best
    assert registry.versions("tiny", reg) == list(range(1, int(summary["model"].split("@")[1]) + 1))
    # The run folder itself is a model reference (its best model).
    assert registry.load_model(out).config == ModelConfig(architecture="unet", input_size=32, num_filters=8, depth=3)


def test_same_spec_and_seed_give_the_same_history(trained: dict[str, Any], settings, isic: str, tmp_path) -> None:
    # The shared run's spec again, into another folder, untracked and for its first 3 epochs only (nothing in an
    # epoch depends on how many follow): flips, colour jitter and the local shuffle on, every random draw seeded,
    # the split's order fixed, so each of those epochs' numbers comes out the same.
    again = train.run(_spec(isic, str(tmp_path / "again"), str(tmp_path / "registry"), epochs=3), settings)
    histories = [trained["history"][:3], json.loads(storage.read_text(again["output"] + "/metrics.json"))]
    timing = {"train_images_per_s", "epoch_time_s"}
    first, second = ([{k: v for k, v in row.items() if k not in timing} for row in h] for h in histories)
    assert len(first) == 3 and [row.keys() for row in first] == [row.keys() for row in second]
    for a, b in zip(first, second, strict=True):
        assert a == pytest.approx(b, abs=1e-4), (a, b)


def test_task2_validation_reports_the_official_scores_of_its_predictions(ray_local, settings, make_isic,
                                                                         tmp_path) -> None:
    # Two workers, each scoring every other validation batch: the epoch's scores must be metrics.py's own
    # (one pixel count per image and attribute, pooled) for the published model on the whole validation split.
    # The seed model has no BatchNorm, so every worker's weights are exactly the published ones.
    isic2 = make_isic(str(tmp_path / "isic2"), num_images=24, tasks=(2,))
    model = {"architecture": "multitask_unet", "task": 2, "input_size": 32, "num_filters": 4}
    # 9 validation images in batches of 2: 5 batches, the last of one image, 3 for one worker and 2 for the other.
    spec_ = _spec(isic2, str(tmp_path / "run"), str(tmp_path / "registry"), model=model, epochs=1, batch_size=2,
                  val_fraction=0.375)
    summary = train.run(spec_, settings)
    [row] = json.loads(storage.read_text(f"{summary['output']}/metrics.json"))

    samples = data.discover(isic2, task=2).samples
    splits = {"validation": data.split_samples(samples, split_csv=f"{summary['output']}/split.csv")["validation"]}
    validation = train.prepare(splits, spec_)[0]["validation"]
    loaded = registry.load_model(summary["model"], registry=str(tmp_path / "registry")).model.eval()
    counts, pixels, names, loss_sum = [], [], [], 0.0
    for batch in validation.iter_torch_batches(batch_size=spec_.batch_size):
        image, mask = batch["image"].float() / 255, batch["mask"].float()
        with torch.no_grad():
            outputs = loaded(image)
        loss_sum += compute_loss(outputs, mask, batch["present"], spec_.loss).item() * len(image)
        predicted = (torch.sigmoid(outputs[0]) > spec_.threshold).numpy()
        for truth, prediction in zip(mask.numpy().astype(np.uint8) * 255, predicted.astype(np.uint8) * 255,
                                     strict=True):
            counts += [metrics.pixel_counts(t, p) for t, p in zip(truth, prediction, strict=True)]
            pixels += [truth[0].size] * len(data.ATTRIBUTES)
            names += data.ATTRIBUTES
    assert summary["validation_images"] > 2 * spec_.batch_size  # batches enough for both workers
    expected = metrics.task2_scores(np.array(counts), pixels, names)
    assert row["val_loss"] == pytest.approx(loss_sum / summary["validation_images"], rel=1e-5)
    assert row["val_score"] == pytest.approx(expected["jaccard"], abs=1e-6) and 0 < row["val_score"] < 1
    assert row["val_dice"] == pytest.approx(expected["dice"], abs=1e-6)
    per_attribute = {name: row[f"jaccard_{name}"] for name in data.ATTRIBUTES}
    assert per_attribute == pytest.approx({k: v["jaccard"] for k, v in expected["per_attribute"].items()}, abs=1e-6)
    assert len(set(per_attribute.values())) > 1, per_attribute  # not one constant for every attribute


def test_spec_rules(isic: str, tmp_path) -> None:
    with pytest.raises(spec.SpecError, match=re.escape("num_workers: [min, max] needs min <= max, got [3, 2]")):
        _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), num_workers=[3, 2])
    with pytest.raises(spec.SpecError, match="precision: bf16 mixed precision needs use_gpu: true"):
        _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), precision="bf16")
    with pytest.raises(spec.SpecError, match="model.input_size"):
        _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), model={"input_size": 40})
    elastic = _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), num_workers=[1, 2])
    assert elastic.num_workers == (1, 2)
    assert "model:tiny" in elastic.produces()
    with pytest.raises(spec.SpecError, match="seed: must be at least 0, got -1"):
        _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), seed=-1)
    # Made absolute where the spec is read: Train's workers run in folders of their own.
    pretrained = {"architecture": "multitask_unet", "input_size": 32, "pretrained_encoder": "weights/vgg16.pth"}
    relative = _spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), model=pretrained)
    assert relative.model.pretrained_encoder == os.path.abspath("weights/vgg16.pth")
    with pytest.raises(spec.SpecError, match="model.pretrained_encoder: nothing found at"):
        relative.check(CheckContext("test"))


def test_no_readable_training_image_is_an_error_before_training(ray_local, settings, make_isic, tmp_path) -> None:
    isic = make_isic(str(tmp_path / "isic"), num_images=6)
    inputs = tmp_path / "isic" / "ISIC2018_Task1-2_Training_Input"
    ids = sorted(path.stem for path in inputs.glob("*.jpg"))
    for image_id in ids[2:]:  # the training split's images are broken, the validation ones fine
        (inputs / f"{image_id}.jpg").write_bytes(b"not a jpeg")
    split = tmp_path / "split.csv"
    split.write_text("id,split\n" + "".join(f"{i},{'validation' if n < 2 else 'train'}\n" for n, i in enumerate(ids)))
    with pytest.raises(ValueError, match="none of the 4 train images is readable: nothing to learn from"):
        train.run(_spec(isic, str(tmp_path / "o"), str(tmp_path / "r"), split_csv=str(split)), settings)


def test_a_resumed_run_refuses_images_its_split_lacks(settings, make_isic, tmp_path) -> None:
    isic = make_isic(str(tmp_path / "isic"), num_images=4)
    ids = sorted(path.stem for path in (tmp_path / "isic" / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))
    output = tmp_path / "o"  # as a run on the first three images left it
    storage.write_text(str(output / "split.csv"), "id,split\n" + "".join(f"{i},train\n" for i in ids[:3]))
    with pytest.raises(ValueError, match=re.escape(f"1 samples are not in {output}/split.csv (e.g. {ids[3]}): the "
                                                   "training data changed since this output's run started")):
        train.run(_spec(isic, str(output), str(tmp_path / "r")), settings)


def test_augment_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    image = torch.zeros(4, 3, 32, 32)
    image[:, :, 4:14, 6:20] = 1.0
    mask = image[:, :1].clone()
    config = AugmentConfig(color=False)
    out_image, out_mask = augment(image, mask, config, torch.Generator().manual_seed(1))
    assert not torch.equal(out_image, image)
    # Geometry is shared: the mask is where the (binary) image is.
    agree = ((out_image[:, :1] > 0.5) == (out_mask > 0.5)).float().mean()
    assert agree > 0.98
    coloured, _ = augment(image, mask, AugmentConfig(flip=False, affine=False),
                                torch.Generator().manual_seed(1))
    assert coloured.min() >= 0 and coloured.max() <= 1 and not torch.equal(coloured, image)


class _RunsCode:
    """Unpickling this object creates a folder: the code a tampered checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"epoch": 3, "history": [], "starts": 0, "payload": _RunsCode(str(marker))},
               tmp_path / train.TRAIN_STATE_FILE)
    with pytest.raises(ValueError, match=r"refused to load .*/train_state.pt: it holds a posix.mkdir object, .*could "
                                         "run code. Resume from a checkpoint lesion-ray wrote"):
        train.read_train_state(str(tmp_path))
    assert not marker.exists()
    # What lesion-ray itself writes (optimizer and scheduler state included) still loads.
    weights = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([weights])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    scheduler.step(1.0)
    torch.save({"epoch": 3, "history": [{"val_score": 0.5}], "starts": 1, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp_path / train.TRAIN_STATE_FILE)
    assert train.read_train_state(str(tmp_path))["history"] == [{"val_score": 0.5}]
