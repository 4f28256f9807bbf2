"""Checkpoint files, the model registry and model references, locally and through S3 (moto)."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lesion_ray import registry, storage
from lesion_ray.cluster import LocalCluster, load_cluster
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.settings import Settings
from lesion_ray.spec import CheckContext

CONFIG = ModelConfig(architecture="unet", task=2, input_size=32, num_filters=4, depth=2)
PUBLISHERS = 8


@pytest.fixture(params=["local", "s3"])
def reg(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_bucket") + "/registry"


def _model_dir(uri: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = registry.plain_state_dict(build_model(CONFIG))
    registry.save_model_dir(uri, state, registry.config_to_json(CONFIG, threshold=0.3))
    return state


def _assert_weights(loaded: registry.LoadedModel, state: dict[str, torch.Tensor]) -> None:
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_a_model_named_by_digits_counts_its_versions_from_one(reg: str, tmp_path) -> None:
    _model_dir(str(tmp_path / "a"))
    assert [registry.publish(str(tmp_path / "a"), "2018", {}, reg) for _ in range(2)] == ["2018@1", "2018@2"]
    assert registry.versions("2018", reg) == [1, 2]


def test_publish_and_lookup(tmp_path) -> None:
    reg = str(tmp_path / "registry")
    first = _model_dir(str(tmp_path / "a"), seed=1)
    second = _model_dir(str(tmp_path / "b"), seed=2)
    assert registry.publish(str(tmp_path / "a"), "lesions", {"val_score": 0.4}, reg) == "lesions@1"
    assert registry.publish(str(tmp_path / "b"), "lesions", {"val_score": 0.5}, reg) == "lesions@2"
    assert registry.versions("lesions", reg) == [1, 2]
    assert json.loads((tmp_path / "registry/lesions/latest.json").read_text())["version"] == 2
    assert sorted(p.name for p in (tmp_path / "registry/lesions/2").iterdir()) == [
        "claim.json", "config.json", "metrics.json", "model.pt"]

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


def test_the_jobs_registry_comes_from_the_cluster_config(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cluster.yaml").write_text("kind: local\nregistry: models/registry\n")
    # Absolute, so that Ray workers in other folders find the same registry.
    assert Settings.build(load_cluster(str(tmp_path / "cluster.yaml"))).registry == str(tmp_path / "models/registry")
    assert Settings.build(LocalCluster()).registry == str(tmp_path / "runs" / "registry")
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


def test_a_file_that_is_not_a_state_dict_is_refused_with_advice(tmp_path) -> None:
    _model_dir(str(tmp_path / "m"))
    model_file = tmp_path / "m" / "model.pt"
    torch.save(build_model(CONFIG), model_file)  # the whole pickled model, as some training scripts save it
    with pytest.raises(ValueError, match=re.escape(
            f"refused to load {model_file}: it holds a lesion_ray.models.UNet object, and loading objects other than "
            "tensors, numbers, strings, lists and dicts could run code. Save the weights with "
            "torch.save(model.state_dict(), path).")):
        registry.load_model(str(tmp_path / "m"))
    model_file.write_bytes(b"not torch")
    with pytest.raises(ValueError, match=re.escape(f"refused to load {model_file}: it is not a file torch.save wrote, "
                                                   "or it is damaged. Save the weights")):
        registry.load_model(str(tmp_path / "m"))
    torch.save(build_model(CONFIG).state_dict(), model_file)
    model_file.write_bytes(model_file.read_bytes()[:1000])  # cut short, as by a failed copy
    with pytest.raises(ValueError, match=re.escape("it is not a file torch.save wrote, or it is damaged "
                                                   "(PytorchStreamReader failed reading zip archive: failed finding "
                                                   "central directory). Save the weights")):
        registry.load_model(str(tmp_path / "m"))


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


def test_model_ref_check(tmp_path) -> None:
    ctx = CheckContext("job.yaml", registry=str(tmp_path / "registry"))
    with pytest.raises(storage.StorageError, match="train it first"):
        registry.ModelRef("lesions@latest").check(ctx)
    # A model an earlier pipeline step trains passes the check before it exists.
    registry.ModelRef("lesions@latest").check(CheckContext("job.yaml", produced=["model:lesions"]))
    _model_dir(str(tmp_path / "m"))
    registry.publish(str(tmp_path / "m"), "lesions", {}, ctx.registry)
    registry.ModelRef("lesions@1").check(ctx)
    registry.ModelRef(str(tmp_path / "m")).check(ctx)


def test_round_trip_through_s3(s3_bucket: str) -> None:
    state = _model_dir(f"{s3_bucket}/checkpoints/epoch-3")
    ref = registry.publish(f"{s3_bucket}/checkpoints/epoch-3", "lesions", {"val_score": 0.7}, f"{s3_bucket}/reg")
    assert ref == "lesions@1"
    assert storage.exists(f"{s3_bucket}/reg/lesions/1/model.pt")
    loaded = registry.load_model(f"{s3_bucket}/reg/lesions@latest")
    assert loaded.uri == f"{s3_bucket}/reg/lesions/1" and loaded.metrics == {"val_score": 0.7}
    _assert_weights(loaded, state)
    _assert_weights(registry.load_model(f"{s3_bucket}/checkpoints/epoch-3/model.pt"), state)


def _publisher(index: int, model_dir: str, registries: list[str], barrier, results) -> None:
    """One training process at its end: publishes its model as "lesions" in each registry, released
    together with the others by ``barrier``."""
    for reg in registries:
        barrier.wait(timeout=120)
        results.put((reg, index, registry.publish(model_dir, "lesions", {"publisher": index}, reg)))


def test_concurrent_publishers_get_distinct_complete_versions(tmp_path, s3_bucket: str) -> None:
    registries = [str(tmp_path / "registry"), f"{s3_bucket}/registry"]
    states = [_model_dir(str(tmp_path / f"run{i}"), seed=i) for i in range(PUBLISHERS)]
    # One set of processes races on both registries: each spawn costs seconds.
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PUBLISHERS), ctx.Queue()
    processes = [ctx.Process(target=_publisher, args=(i, str(tmp_path / f"run{i}"), registries, barrier, results))
                 for i in range(PUBLISHERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * PUBLISHERS
    published = [results.get(timeout=10) for _ in range(PUBLISHERS * len(registries))]

    for reg in registries:
        refs = {index: ref for where, index, ref in published if where == reg}
        assert sorted(refs.values(), key=lambda ref: int(ref.split("@")[1])) == [
            f"lesions@{v}" for v in range(1, PUBLISHERS + 1)]
        assert registry.versions("lesions", reg) == list(range(1, PUBLISHERS + 1))
        for index, ref in refs.items():
            version = int(ref.split("@")[1])
            config = json.loads(storage.read_text(storage.join(reg, "lesions", str(version), registry.CONFIG_FILE)))
            assert (config["name"], config["version"]) == ("lesions", version)
            loaded = registry.load_model(f"{reg}/{ref}")
            assert loaded.metrics == {"publisher": index}
            _assert_weights(loaded, states[index])
        assert registry.resolve(f"{reg}/lesions@latest").version == str(PUBLISHERS)


def test_latest_only_moves_forward(reg: str, tmp_path, monkeypatch) -> None:
    """A publisher that claimed version 1 but finishes after version 2 leaves latest at 2."""
    slow = _model_dir(str(tmp_path / "slow"), seed=1)
    fast = _model_dir(str(tmp_path / "fast"), seed=2)
    paused, resume = threading.Event(), threading.Event()
    create_exclusive = storage.create_exclusive

    def pause_before_version_1_is_visible(uri: str, data: bytes) -> bool:
        if uri == storage.join(reg, "lesions", "1", registry.CONFIG_FILE):
            paused.set()
            resume.wait(timeout=60)
        return create_exclusive(uri, data)

    # Only timing changes: every write still goes through the real storage function.
    monkeypatch.setattr(storage, "create_exclusive", pause_before_version_1_is_visible)
    with ThreadPoolExecutor(1) as pool:
        try:
            slow_ref = pool.submit(registry.publish, str(tmp_path / "slow"), "lesions", {"run": "slow"}, reg)
            assert paused.wait(timeout=60)
            # Version 1 has its weights but no config.json yet: nobody sees it.
            assert registry.versions("lesions", reg) == []
            with pytest.raises(storage.StorageError, match="lesions@1 is not in the registry"):
                registry.resolve("lesions@1", reg)
            assert registry.publish(str(tmp_path / "fast"), "lesions", {"run": "fast"}, reg) == "lesions@2"
        finally:
            resume.set()
        assert slow_ref.result(timeout=60) == "lesions@1"
    assert registry.versions("lesions", reg) == [1, 2]
    latest = registry.load_model("lesions@latest", registry=reg)
    assert (latest.version, latest.metrics) == ("2", {"run": "fast"})
    _assert_weights(latest, fast)
    _assert_weights(registry.load_model("lesions@1", registry=reg), slow)
