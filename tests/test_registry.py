"""Checkpoint files, the model registry and model references, locally and through S3 (moto)."""

from __future__ import annotations

import json

import pytest
import torch

from lesion_ray import registry, storage
from lesion_ray.model import ModelConfig, build_model
from lesion_ray.spec import CheckContext

CONFIG = ModelConfig(architecture="unet", task=2, input_size=32, num_filters=4, depth=2)


def _model_dir(uri: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = registry.plain_state_dict(build_model(CONFIG))
    registry.save_model_dir(uri, state, registry.config_to_json(CONFIG, threshold=0.3))
    return state


def _assert_weights(loaded: registry.LoadedModel, state: dict[str, torch.Tensor]) -> None:
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_publish_and_lookup(tmp_path) -> None:
    reg = str(tmp_path / "registry")
    first = _model_dir(str(tmp_path / "a"), seed=1)
    second = _model_dir(str(tmp_path / "b"), seed=2)
    assert registry.publish(str(tmp_path / "a"), "lesions", {"val_score": 0.4}, reg) == "lesions@1"
    assert registry.publish(str(tmp_path / "b"), "lesions", {"val_score": 0.5}, reg) == "lesions@2"
    assert registry.versions("lesions", reg) == [1, 2]
    assert json.loads((tmp_path / "registry/lesions/latest.json").read_text())["version"] == 2
    assert sorted(p.name for p in (tmp_path / "registry/lesions/2").iterdir()) == [
        "config.json", "metrics.json", "model.pt"]

    latest = registry.load_model("lesions@latest", registry=reg)
    assert (latest.name, latest.version, latest.threshold) == ("lesions", "2", 0.3)
    assert latest.config == CONFIG and latest.metrics == {"val_score": 0.5}
    assert not latest.model.training
    _assert_weights(latest, second)
    _assert_weights(registry.load_model(f"{reg}/lesions@1"), first)
    _assert_weights(registry.load_model(str(tmp_path / "registry/lesions/1/model.pt")), first)
    _assert_weights(registry.load_model(str(tmp_path / "registry/lesions/1")), first)
    with pytest.raises(storage.StorageError, match=r"lesions@7 is not in the registry .*versions: 1, 2"):
        registry.load_model("lesions@7", registry=reg)


def test_default_registry_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LESION_RAY_REGISTRY", str(tmp_path / "env-registry"))
    assert registry.default_registry() == str(tmp_path / "env-registry")
    monkeypatch.delenv("LESION_RAY_REGISTRY")
    monkeypatch.chdir(tmp_path)
    assert registry.default_registry() == str(tmp_path / "runs" / "registry")


def test_module_prefixed_and_wrapped_files_load(tmp_path) -> None:
    state = _model_dir(str(tmp_path / "m"))
    # What nn.DataParallel / DDP training scripts save: "module." keys, sometimes inside {"state_dict": ...}.
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "m" / "model.pt")
    _assert_weights(registry.load_model(str(tmp_path / "m" / "model.pt")), state)
    wrapper = torch.nn.DataParallel(build_model(CONFIG))
    assert all(k.startswith("module.") for k in wrapper.state_dict())
    assert not any(k.startswith("module.") for k in registry.plain_state_dict(wrapper))


def test_bad_references(tmp_path) -> None:
    with pytest.raises(storage.StorageError, match="not in the registry"):
        registry.resolve("nothing@latest", str(tmp_path))
    with pytest.raises(storage.StorageError, match="no model at"):
        registry.resolve(str(tmp_path))
    (tmp_path / "x.pt").write_bytes(b"not torch")
    with pytest.raises(storage.StorageError, match="no config.json"):
        registry.resolve(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="model name"):
        registry.publish(str(tmp_path), "bad name", {}, str(tmp_path))


def test_model_ref_check(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LESION_RAY_REGISTRY", str(tmp_path / "registry"))
    ctx = CheckContext("job.yaml")
    with pytest.raises(storage.StorageError, match="train it first"):
        registry.ModelRef("lesions@latest").check(ctx)
    # A model an earlier pipeline step trains passes the check before it exists.
    registry.ModelRef("lesions@latest").check(CheckContext("job.yaml", produced=["model:lesions"]))
    _model_dir(str(tmp_path / "m"))
    registry.publish(str(tmp_path / "m"), "lesions", {}, None)
    registry.ModelRef("lesions@1").check(ctx)
    registry.ModelRef(str(tmp_path / "m")).check(ctx)


def test_round_trip_through_s3(s3_bucket: str, tmp_path) -> None:
    state = _model_dir(f"{s3_bucket}/checkpoints/epoch-3")
    ref = registry.publish(f"{s3_bucket}/checkpoints/epoch-3", "lesions", {"val_score": 0.7}, f"{s3_bucket}/reg")
    assert ref == "lesions@1"
    assert storage.exists(f"{s3_bucket}/reg/lesions/1/model.pt")
    loaded = registry.load_model(f"{s3_bucket}/reg/lesions@latest")
    assert loaded.uri == f"{s3_bucket}/reg/lesions/1" and loaded.metrics == {"val_score": 0.7}
    _assert_weights(loaded, state)
    _assert_weights(registry.load_model(f"{s3_bucket}/checkpoints/epoch-3/model.pt"), state)
