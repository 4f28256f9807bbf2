"""Shared by the benchmarks: a moto S3 server of their own, an untrained published model and a
peak-memory sampler.

The benchmarks run as ``python benchmarks/bench_x.py``, which puts this folder on ``sys.path``,
so they import it as ``from common import ...``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import torch

from lesion_ray import registry, storage
from lesion_ray.cluster import LocalCluster
from lesion_ray.models import ModelConfig, build_model
from lesion_ray.settings import Settings
from lesion_ray.spec import StorageSettings
from lesion_ray.testing.loopback import free_port


def start_s3(bucket: str | None = None) -> tuple[subprocess.Popen, Settings]:
    """Start a moto S3 server on a free loopback port, give boto3 fake credentials, wait until it accepts
    connections and create ``bucket`` if given. Returns the server and the job settings that point at it
    (installed in this process, as the CLI installs them).

    The server runs in a separate process, so it shares no GIL with the benchmark; the caller
    terminates it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    url = f"http://127.0.0.1:{port}"
    settings = Settings.build(LocalCluster(storage=StorageSettings(endpoint_url=url)))
    storage.configure(settings.storage)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the moto S3 server did not start")
        if bucket:
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    except BaseException:
        server.terminate()
        server.wait()
        raise
    return server, settings


def publish_model(config: ModelConfig, registry_uri: str, folder: str) -> str:
    """An untrained model of ``config`` (seed 0), published as ``bench`` in ``registry_uri``."""
    torch.manual_seed(0)
    registry.save_model_dir(folder, registry.plain_state_dict(build_model(config)),
                            registry.config_to_json(config, threshold=0.5))
    return registry.publish(folder, "bench", {}, registry_uri)


def process_tree(root: int, exclude: int | None = None) -> list[int]:
    """``root`` and all its descendants, leaving out ``exclude`` and its own descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # the process ended while listing
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid != exclude:
            found.append(pid)
            stack.extend(children.get(pid, []))
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (shared pages split among their users), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0  # the process ended between listing and reading


class PeakMemory:
    """Peak summed PSS, in bytes, of ``root`` (default: this process) and its descendants, but not
    ``exclude`` (e.g. the moto server) or its descendants; sampled every ``every_s`` in a thread.

    ``with PeakMemory(exclude=server.pid) as memory: ...`` then ``memory.peak``; ``children=False``: ``root``
    alone."""

    def __init__(self, exclude: int | None = None, root: int | None = None, every_s: float = 0.2,
                 children: bool = True) -> None:
        self.exclude, self.root, self.every_s = exclude, os.getpid() if root is None else root, every_s
        self.children = children
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.root, self.exclude) if self.children else [self.root]
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in pids))
            self._stop.wait(self.every_s)
