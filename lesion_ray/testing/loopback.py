"""A real multi-node Ray cluster on one machine: a ``ray start`` head and workers on loopback.

For trying ``cluster/remote.yaml`` end to end before there is a cluster (:mod:`lesion_ray.testing.multinode`)
and for the multi-node tests. Every node is a ``ray start --block`` process in its own process
group with its own free ports, so such a cluster can run beside an embedded Ray; stopping a node
kills exactly that node, as a machine failure would. Token authentication is on, as on Ray 2.60
clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

NODE_RESOURCE_PREFIX = "loopback_node_"  # a unit resource that names each node (`ray start` has no node names)
# `ray start` flags whose default ports clash with any other Ray on the machine: each node gets its own.
AGENT_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                    "metrics-export-port")
# Raylet and GCS settings of every node, for a cluster whose nodes share one small machine:
NODE_CONFIG = {
    # the GCS checks each node every second and calls it dead after 3 missed checks: a killed node is noticed in
    # about 3 s instead of Ray's 15 s (5 checks 3 s apart);
    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
    # a node keeps up to 16 idle workers: past the soft limit (one per CPU, which predict's half-CPU stage tasks
    # exceed) Ray kills a worker idle for 1 s, and the next task starts a process that imports torch again.
    "RAY_num_workers_soft_limit": "16",
}


_handed_out: set[int] = set()


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999),
    so that no outgoing connection can take it before the node binds it."""
    while True:
        port = random.randint(20000, 32767)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a ``ray start --block`` process's group and reap it. Without SIGTERM first: such a node takes about
    30 s to exit on SIGTERM (measured on 2 cores), so any shorter grace would only delay the kill."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


class LoopbackCluster:
    """A head node (``head_cpus`` logical CPUs, dashboard and Jobs API on a free port) plus workers."""

    def __init__(self, head_cpus: int = 0) -> None:
        # A short folder under /tmp: Ray's unix socket paths must stay below ~107 characters.
        self.root = tempfile.mkdtemp(prefix="lr-ray-", dir="/tmp")
        self._keep_root = False  # set when a failure keeps the folder for its logs
        self.token = uuid.uuid4().hex
        self.gcs_address = f"127.0.0.1:{free_port()}"
        dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}  # name -> its `ray start` process
        self._start("head", ["--head", f"--port={self.gcs_address.split(':')[1]}", f"--dashboard-port={dashboard_port}",
                             f"--ray-client-server-port={free_port()}",
                             "--dashboard-host=127.0.0.1", f"--num-cpus={head_cpus}", f"--temp-dir={self.root}"], {})
        self._wait_for_dashboard(timeout_s=90)

    def env(self) -> dict[str, str]:
        """Environment for `ray` commands and drivers that join this cluster."""
        venv_bin = os.path.dirname(sys.executable)
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}

    def remote_config(self, **overrides: Any) -> dict[str, Any]:
        """A ``kind: remote`` cluster config (as in cluster/remote.yaml) that reaches this cluster."""
        return {"kind": "remote", "name": "loopback", "address": self.dashboard_url,
                "auth_token_env": "RAY_AUTH_TOKEN", "auth_token_file": None, "dependencies": "installed", **overrides}

    def add_worker(self, name: str, num_cpus: int = 2, resources: dict[str, float] | None = None) -> None:
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} exists already")
        # Its own temp dir: nodes starting at once in one dir race for the same socket file names.
        self._start(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                                  f"--temp-dir={os.path.join(self.root, name)}"], resources or {})

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> None:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        resources = {**resources, NODE_RESOURCE_PREFIX + name: 1}
        ports = [f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS]
        with open(os.path.join(self.root, f"{name}.log"), "wb") as out:
            self.nodes[name] = subprocess.Popen(
                [ray_bin, "start", "--block", "--disable-usage-stats", *args, *ports,
                 f"--resources={json.dumps(resources)}"],
                env={**self.env(), **NODE_CONFIG}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._get("/api/version")
                return
            except (OSError, json.JSONDecodeError):  # HTTPError is an OSError
                time.sleep(0.5)
        self._keep_root = True  # the error points at its log
        self.shutdown()
        raise RuntimeError(f"the Ray head did not come up within {timeout_s:g} s; see {self.root}/head.log")

    def alive_nodes(self) -> dict[str, str]:
        """Node name -> Ray node id, for the nodes Ray reports alive."""
        nodes = self._get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
        named = {}
        for node in nodes:
            if node["state"] != "ALIVE":
                continue
            for resource in node.get("resources_total", {}):
                if resource.startswith(NODE_RESOURCE_PREFIX):
                    named[resource[len(NODE_RESOURCE_PREFIX):]] = node["node_id"]
        return named

    def wait_for_nodes(self, timeout_s: float = 90) -> dict[str, str]:
        """Until every started node, and no stopped one, is alive in Ray's view."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = self.alive_nodes()
            except (OSError, json.JSONDecodeError):  # the State API of a busy or starting head drops requests
                alive = {}
            if set(alive) == set(self.nodes):
                return alive
            if time.monotonic() > deadline:
                self._keep_root = True
                raise RuntimeError(f"Ray sees nodes {sorted(alive)}, expected {sorted(self.nodes)}; "
                                   f"logs in {self.root}")
            time.sleep(0.5)

    def actors(self, class_name_prefix: str, alive: bool = True) -> dict[str, str]:
        """Actor id -> the name of its node, for the actors whose class name starts with the prefix: those alive,
        or (``alive=False``) every one Ray still remembers, ended ones too."""
        only_alive = "&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE" if alive else ""
        actors = self._get(f"/api/v0/actors?limit=10000&detail=true{only_alive}")["data"]["result"]["result"]
        by_id = {node_id: name for name, node_id in self.alive_nodes().items()}
        return {a["actor_id"]: by_id.get(a["node_id"], a["node_id"]) for a in actors
                if a["class_name"].startswith(class_name_prefix)}

    def actor_nodes(self, class_name_prefix: str) -> list[str]:
        """Names of the nodes that hold alive actors whose class name starts with the prefix."""
        return sorted(self.actors(class_name_prefix).values())

    def stop_node(self, name: str) -> None:
        """Kill a node and every process it started at once, as a machine failure would."""
        kill_node(self.nodes.pop(name))

    def shutdown(self) -> None:
        """Kill every node (see :func:`kill_node`); remove the cluster's folder unless a failure kept it for its
        logs."""
        for name in reversed(list(self.nodes)):
            self.stop_node(name)
        if not self._keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
