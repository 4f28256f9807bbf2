"""Shared fixtures: a real S3 endpoint (moto server on loopback) and one local Ray per session.

The S3 endpoint is started before Ray so that every Ray worker inherits its address and the
fake credentials through the same environment variables a user would set.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from lesion_ray import storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of a moto S3 server on loopback, exported as AWS_ENDPOINT_URL for the session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
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
    """One local Ray for the session with more logical CPUs than the 2 physical cores."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": storage.storage_env()},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
