"""A cluster started with exactly cluster/aws.yaml's start commands, on loopback, refuses unauthenticated jobs.

The launcher's commands run as written except for what a single machine changes: free ports instead
of the fixed ones, 127.0.0.1 instead of 0.0.0.0, no autoscaler (it needs a cloud), the foreground
(``--block``, so that each node is one process group to kill) and no ``ray stop`` (it would stop
every Ray on this machine). Each node has its own HOME, as each instance has its own disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from lesion_ray.testing import wait_for
from lesion_ray.testing.loopback import AGENT_PORT_FLAGS, free_port, kill_node

StartNode = Callable[..., str]


def _on_loopback(command: str, gcs_port: int, dashboard_port: int | None, temp_dir: str) -> str:
    command = re.sub(r" --autoscaling-config=\S+", "", command)
    command = re.sub(r"(?<=[=:])6379\b", str(gcs_port), command)
    command = command.replace("--object-manager-port=8076", f"--object-manager-port={free_port()}")
    command = command.replace("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1")
    assert not re.search(r"6379|8076|0\.0\.0\.0|autoscaling", command), f"cluster/aws.yaml changed: {command}"
    flags = [f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS] + [f"--temp-dir={temp_dir}", "--block"]
    if dashboard_port:
        flags += [f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}"]
    return " ".join([command, *flags])


@pytest.fixture
def start_node(tmp_path) -> Iterator[StartNode]:
    """Runs one node type's start commands as the launcher does; returns what the steps before
    `ray start` printed. Every node is killed, with all it started, at teardown."""
    nodes: list[subprocess.Popen] = []
    temp_dirs: list[str] = []
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def start(commands: list[str], home: Path, gcs_port: int, dashboard_port: int | None = None) -> str:
        home.mkdir(parents=True, exist_ok=True)
        # Short and under /tmp: Ray's unix socket paths must stay below ~107 characters.
        temp_dirs.append(tempfile.mkdtemp(prefix="lr-aws-", dir="/tmp"))
        env = {**clean, "HOME": str(home), "RAY_HEAD_IP": "127.0.0.1", "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
        printed = ""
        for command in commands:
            if command == "ray stop":
                continue
            if "ray start" in command:
                with open(tmp_path / f"{home.name}.log", "wb") as log:
                    nodes.append(subprocess.Popen(
                        ["bash", "-c", _on_loopback(command, gcs_port, dashboard_port, temp_dirs[-1])],
                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                continue
            done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{command}: {done.stderr}"
            printed += done.stdout + done.stderr
        return printed

    yield start
    for node in nodes:
        kill_node(node)
    for temp_dir in temp_dirs:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _request(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def _submit(dashboard: str, token: str | None = None) -> int:
    return _request(f"{dashboard}/api/jobs/", token, {"entrypoint": "echo ran"})[0]


def _wait_for(what: str, check: Callable[[], bool], logs: Path) -> None:
    try:
        wait_for(what, check, timeout_s=120)
    except TimeoutError as exc:
        log_tails = {p.name: p.read_text(errors="replace")[-2000:] for p in logs.glob("*.log")}
        pytest.fail(f"{exc}; logs: {log_tails}")


def _answers(url: str) -> bool:
    with contextlib.suppress(urllib.error.URLError, OSError):  # not listening yet
        _request(url)
        return True
    return False


def _alive_nodes(dashboard: str, token: str) -> int:
    status, body = _request(f"{dashboard}/api/v0/nodes?limit=100&detail=true", token)
    nodes = json.loads(body)["data"]["result"]["result"] if status == 200 else []
    return sum(node["state"] == "ALIVE" for node in nodes)


@pytest.mark.slow
def test_cluster_started_by_aws_yaml_refuses_jobs_without_the_heads_token(start_node: StartNode, tmp_path) -> None:
    config = yaml.safe_load(Path("cluster/aws.yaml").read_text())
    gcs_port, dashboard_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    head_home = tmp_path / "head"
    printed = start_node(config["head_start_ray_commands"], head_home, gcs_port, dashboard_port)
    _wait_for("the head's dashboard", lambda: _answers(f"{dashboard}/api/version"), tmp_path)

    assert _submit(dashboard) == 401  # a fresh head without RAY_AUTH_MODE=token accepts (200) and runs it
    token_file = head_home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and token not in printed  # the launcher logs what its commands print
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert _submit(dashboard, "not-the-token") == 403
    _wait_for("the job agent to accept a job with the token", lambda: _submit(dashboard, token) == 200, tmp_path)

    # A worker gets the head's token as the launcher's cluster_synced_files copies it (mode kept), and joins.
    worker_home = tmp_path / "worker"
    for path in config["cluster_synced_files"]:
        assert path.startswith("~/")
        (worker_home / path[2:]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(head_home / path[2:], worker_home / path[2:])
    start_node(config["worker_start_ray_commands"], worker_home, gcs_port)
    _wait_for("the worker to join", lambda: _alive_nodes(dashboard, token) == 2, tmp_path)
