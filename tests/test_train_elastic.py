"""Training across Ray nodes that come and go (``ray.cluster_utils.Cluster``: real raylets on this machine).

These tests start their own multi-node cluster, so they cannot share the session's ``ray_local``:
``without_local_ray`` stops it for this module and starts it again afterwards.

Train workers need one unit of a ``trainer`` resource that only the extra nodes have (and those
nodes have no CPUs, so Ray Data's tasks stay on the head): which node holds a worker is then known,
and removing that node kills the worker for real.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from lesion_ray import spec, storage, train

pytestmark = pytest.mark.slow


def _node_args(**args: Any) -> dict[str, Any]:
    """Node arguments with free agent ports: the defaults clash with any other Ray on this machine."""
    ports = {}
    for name in ("dashboard_agent_listen_port", "metrics_export_port", "metrics_agent_port", "runtime_env_agent_port"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    return {**args, **ports}


def _trainer_node(cluster: Cluster):
    return cluster.add_node(**_node_args(num_cpus=0, resources={"trainer": 1}))


@pytest.fixture(scope="module")
def cluster(without_local_ray) -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(num_cpus=2, include_dashboard=False))
    ray.init(address=cluster.address, runtime_env={"env_vars": storage.storage_env()})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()  # then without_local_ray brings the session's Ray back


@pytest.fixture(scope="module")
def isic(make_isic, tmp_path_factory) -> str:
    return make_isic(str(tmp_path_factory.mktemp("synth") / "isic"), num_images=40)


def _refresh_elastic_view() -> None:
    """Make Ray re-read the node list now, as it otherwise does every 20 s.

    Elastic Train sizes its group from Ray Data's AutoscalingCoordinator, which re-reads the node list on a
    20 s tick. On a real cluster that delay is harmless; here it would let a short run finish before the
    joined node is seen, or start a group on nodes an earlier test removed.
    """
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return  # not created yet: its first view will be fresh
    ray.get(coordinator.get_reserved_resources.remote("lesion-ray-tests", recompute=True))


def _spec(isic: str, out: Path, **overrides: Any) -> train.TrainSpec:
    raw = {
        "kind": "train", "name": "train", "data": isic, "output": str(out / "run"), "registry": str(out / "reg"),
        "model": {"architecture": "unet", "input_size": 32, "num_filters": 4, "depth": 2},
        "epochs": 4, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 0,
        "resources_per_worker": {"trainer": 1}, "max_failures": 3, "elastic_resize_interval_s": 1,
    }
    return spec.from_dict(train.TrainSpec, raw | overrides, "test")


def _start(spec_: train.TrainSpec) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = train.run(spec_)
        except Exception as exc:  # surfaced by the test's assertion
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _wait_for_checkpoint(run: Path, thread: threading.Thread, timeout_s: float = 180) -> None:
    """Until Ray Train has registered a checkpoint (its snapshot lists it), not merely written one."""
    deadline = time.monotonic() + timeout_s
    while not (run / "checkpoint_manager_snapshot.json").exists():
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)


def _finish(thread: threading.Thread, outcome: dict[str, Any], run: Path) -> list[dict[str, Any]]:
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish"
    assert "error" not in outcome, outcome.get("error")
    return json.loads((run / "metrics.json").read_text())


def test_node_loss_resumes_from_checkpoint(cluster: Cluster, isic: str, tmp_path: Path) -> None:
    doomed = _trainer_node(cluster)
    survivor = _trainer_node(cluster)
    cluster.wait_for_nodes()
    thread, outcome = _start(_spec(isic, tmp_path))
    _wait_for_checkpoint(tmp_path / "run", thread)
    cluster.remove_node(doomed, allow_graceful=False)
    replacement = _trainer_node(cluster)  # what an autoscaler would do
    history = _finish(thread, outcome, tmp_path / "run")

    assert [row["epoch"] for row in history] == list(range(1, 5))
    assert history[0]["starts"] == 0 and history[-1]["starts"] >= 1  # restarted, from a checkpoint
    assert {row["world_size"] for row in history} == {2}
    assert outcome["summary"]["model"] == "lesion-unet@1"
    for node in (survivor, replacement):
        cluster.remove_node(node)


def test_elastic_group_grows_when_a_node_joins(cluster: Cluster, isic: str, tmp_path: Path) -> None:
    first = _trainer_node(cluster)
    cluster.wait_for_nodes()
    _refresh_elastic_view()
    thread, outcome = _start(_spec(isic, tmp_path, num_workers=[1, 2], epochs=12))
    _wait_for_checkpoint(tmp_path / "run", thread)
    second = _trainer_node(cluster)
    cluster.wait_for_nodes()
    _refresh_elastic_view()
    history = _finish(thread, outcome, tmp_path / "run")

    sizes = [row["world_size"] for row in history]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    assert [row["epoch"] for row in history] == list(range(1, 13))  # the resize resumed, not restarted
    for node in (first, second):
        cluster.remove_node(node)
