"""Shared fixtures: a real S3 endpoint (moto server on loopback) and one local Ray per session.

The S3 endpoint is started before Ray so that every Ray worker inherits its address and the
fake credentials through the same environment variables a user would set.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from lesion_ray import storage
from lesion_ray.loopback import LoopbackCluster, free_port


@pytest.fixture(autouse=True)
def _restore_environ():
    """Commands under test apply cluster configs to os.environ; undo that after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session", autouse=True)
def s3_endpoint() -> str:
    """URL of a moto S3 server on loopback, exported as AWS_ENDPOINT_URL for the whole session.

    Autouse: it is in place before any test's environment snapshot, and no test can reach AWS.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in captured stderr
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    storage.configure(endpoint_url=url)
    yield url
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str):
    """One local Ray for the session (started on first use): more logical CPUs than the 2 physical
    cores, progress bars off."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to a `ray start` cluster another test left running
            num_cpus=8,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": storage.storage_env()},
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_isic():
    """Writes a small synthetic ISIC layout in-process (faster here than Ray tasks); returns its URI."""
    from lesion_ray import spec, synth

    def write(out: str, num_images: int = 60) -> str:
        config = spec.from_dict(synth.SynthSpec, {
            "kind": "synth", "name": "synth", "output": out, "num_images": num_images, "validation_images": 0,
            "width": [64, 96], "tasks": [1], "max_hairs": 2,
        }, "test")
        for index in range(num_images):
            synth.write_image(config, index)
        return out

    return write


@pytest.fixture(scope="module")
def ray_processes(s3_endpoint: str):
    """A real `ray start` head with 4 CPUs and token authentication (add workers with add_worker)."""
    with LoopbackCluster(head_cpus=4) as cluster:
        yield cluster
