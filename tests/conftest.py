"""Shared fixtures: a real S3 endpoint (moto server on loopback) and one local Ray per session.

The S3 endpoint is started before Ray so that every Ray worker inherits its address and the
fake credentials through the same environment variables a user would set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from lesion_ray import storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_local_ray() -> None:
    """The session's local Ray: more logical CPUs than the 2 physical cores, progress bars off."""
    import ray

    ray.init(
        address="local",  # never attach to a `ray start` cluster another test left running
        num_cpus=8,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": storage.storage_env()},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str):
    """One local Ray for the session (started on first use)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def without_local_ray(s3_endpoint: str):
    """For a module that starts its own Ray cluster: the session's local Ray stops, then comes back."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_running:
        start_local_ray()


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


class RayProcessCluster:
    """A Ray cluster of real `ray start` nodes on loopback, each node its own process group.

    Token authentication is on, as `ray start --head` does on Ray 2.60 clusters that have a
    token. Teardown kills only these nodes' processes (never a blanket `ray stop`).
    """

    def __init__(self, root, num_cpus: int = 4) -> None:
        self.root = root
        self.token = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        self._start(["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                     "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={root}"])
        self._wait_for_dashboard()

    def env(self) -> dict[str, str]:
        venv_bin = os.path.dirname(sys.executable)
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, args: list[str]) -> subprocess.Popen:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        # Every node gets its own agent ports: the defaults clash with any other Ray on the machine.
        args = [*args, *(f"--{flag}={_free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port"))]
        with open(os.path.join(self.root, f"node{len(self.nodes)}.log"), "wb") as log:
            node = subprocess.Popen([ray_bin, "start", "--block", "--disable-usage-stats", *args], env=self.env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        return node

    def add_worker(self, num_cpus: int = 2, resources: str | None = None) -> subprocess.Popen:
        args = [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        return self._start(args)

    def _wait_for_dashboard(self, timeout_s: float = 90) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ray head did not come up; see {self.root}/node0.log")

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(node.pid, sig)
                node.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)  # children that outlived the `ray start` process

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


@pytest.fixture(scope="module")
def ray_processes(s3_endpoint: str):
    """A real multi-process Ray head with token authentication (add workers with add_worker)."""
    # Short root: Ray's unix socket paths under it must stay below ~107 characters.
    root = tempfile.mkdtemp(prefix="lr-ray-", dir="/tmp")
    cluster = RayProcessCluster(root)
    yield cluster
    cluster.shutdown()
    shutil.rmtree(root, ignore_errors=True)
