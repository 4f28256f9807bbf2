"""Every job kind across real Ray nodes, submitted through a ``kind: remote`` cluster config.

The scenarios are the documented demo's (``python -m lesion_ray.testing.multinode``): a ``ray start`` head without
CPUs and two 4-CPU workers on loopback with token authentication, and ``cluster/remote.yaml``
pointed at it. The quickstart, submitted once per module (:func:`quickstart_job`), trains the model
and writes the images that inference and serving use, so each test runs alone or in any order.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lesion_ray import cluster
from lesion_ray.testing import multinode
from lesion_ray.testing.loopback import LoopbackCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes(s3_endpoint: str) -> Iterator[LoopbackCluster]:
    with multinode.start_cluster() as nodes:
        yield nodes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def remote(nodes: LoopbackCluster, workdir: Path) -> str:
    return multinode.write_cluster_config(nodes, workdir)


@pytest.fixture(scope="module")
def quickstart_job(remote: str, workdir: Path) -> dict:
    """The quickstart submitted as one job: its exit status, what it printed, its validation images."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = multinode.quickstart(remote, workdir / "quickstart")
    if status != 0:  # every scenario needs its model and images
        pytest.fail(f"the quickstart job failed:\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    images = sorted((workdir / "quickstart" / "data" / "ISIC2018_Task1-2_Validation_Input").glob("*.jpg"))
    return {"status": status, "out": out.getvalue(), "err": err.getvalue(), "images": images}


def test_quickstart_pipeline_runs_as_a_submitted_job(quickstart_job: dict, workdir: Path) -> None:
    assert "pipeline 'quickstart' finished in" in quickstart_job["out"]  # the job's own summary, streamed back
    assert "SUCCEEDED" in quickstart_job["err"]
    assert (workdir / "registry" / "quickstart-unet" / "latest.json").exists()
    assert (workdir / "quickstart" / "evaluation" / "report.html").exists()
    assert quickstart_job["images"]


def test_batch_inference_spreads_over_nodes_and_accounts_for_every_input(
        nodes: LoopbackCluster, remote: str, quickstart_job: dict, s3_bucket: str) -> None:
    images = quickstart_job["images"]
    result = multinode.predict_across_nodes(nodes, remote, images, f"{s3_bucket}/archive", f"{s3_bucket}/masks")
    assert result["status"] == 0
    assert result["rows"] == result["inputs"]  # one row per input, no more, no fewer
    assert result["errors"] == ["ISIC_0099999"]  # the broken file, reported and not fatal
    assert len(result["ok"]) == result["masks"] == 5 * len(images)
    # One inference actor per worker; which of them does the work is Ray Data's choice: it sends a block to an
    # actor on the node that holds it while that actor has room, so a short job's may all go to one.
    assert result["actor_nodes"] == ["worker1", "worker2"]
    assert result["nodes"] and set(result["nodes"]) <= {"worker1", "worker2"}


def test_elastic_training_grows_when_a_node_joins_and_survives_one_leaving(
        nodes: LoopbackCluster, remote: str, workdir: Path, make_isic) -> None:
    data = make_isic(str(workdir / "elastic-data"), num_images=24)
    result = multinode.elastic_training(nodes, remote, data, str(workdir / "elastic"))
    assert result["sizes"] == [2, 3, 2]  # the workers present, then the joiner, then without it
    # Every resize resumed from its last checkpoint: each epoch follows the one before (or, redone after a node
    # loss, repeats it), never an earlier one.
    epochs = result["epochs"]
    steps = [later - earlier for earlier, later in itertools.pairwise(epochs)]
    assert epochs[0] == 1 and set(steps) <= {0, 1}, epochs


def test_serve_answers_through_the_cluster_proxy_and_survives_a_replica_node_stopping(
        nodes: LoopbackCluster, remote: str, quickstart_job: dict) -> None:
    result = multinode.serve_through_node_loss(nodes, remote, quickstart_job["images"][0].read_bytes())
    assert result["replica_nodes"] == ["worker1", "worker2"]  # Serve spread the model replicas
    assert result["killed"] in {"worker1", "worker2"}
    assert result["health"] == {"status": "ok"}


def test_no_token_reaches_a_config_or_a_submitted_jobs_runtime_env(
        nodes: LoopbackCluster, remote: str, quickstart_job: dict) -> None:
    # Everyone with dashboard access reads the runtime_env of every job; the tokens stay in 0600 files.
    token_files = [Path(nodes.root) / multinode.RAY_TOKEN_FILE, Path(nodes.root) / multinode.SERVE_TOKEN_FILE]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in token_files)
    tokens = [f.read_text() for f in token_files]
    jobs = cluster.job_client(cluster.load_cluster(remote)).list_jobs()
    assert jobs  # at least the quickstart's; in a full run every scenario's
    shown = yaml.safe_dump([job.runtime_env for job in jobs]) + Path(remote).read_text()
    assert not any(token in shown for token in tokens)
