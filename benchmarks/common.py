"""Shared by the benchmarks: a moto S3 server of their own, an untrained published model, a
peak-memory sampler, a GPU busy sampler (NVML), synthetic image folders and the result rows that
``gpu_suite.sh`` tabulates.

The benchmarks run as ``python benchmarks/bench_x.py``, which puts this folder on ``sys.path``,
so they import it as ``from common import ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lesion_ray import registry, storage, synth
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
    import boto3  # here, not at the top: the GPU machine has neither boto3 nor moto (local folders there)

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
        # The lowest priority for this thread alone (Linux): reading every process's PSS costs CPU, which must
        # come from idle time, not from the job being measured.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.is_set():
            pids = process_tree(self.root, self.exclude) if self.children else [self.root]
            self.peak = max(self.peak, sum(pss_bytes(pid) for pid in pids))
            self._stop.wait(self.every_s)


# --- Synthetic image folders ------------------------------------------------------------------------


def copy_images(sources: list[str], folder: str, count: int, first_id: int = 0) -> list[str]:
    """``count`` images in ``folder`` named ``ISIC_<first_id + i>.jpg``, each a copy of ``sources[i % len]``
    (more images, same content: decoding costs the same); returns their URIs."""
    targets = [storage.join(folder, f"ISIC_{first_id + i:07d}.jpg") for i in range(count)]

    def copy(i: int) -> None:
        storage.write_bytes(targets[i], storage.read_bytes(sources[i % len(sources)]))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(copy, range(count)))
    return targets


def image_folder(root: str, images: int, settings: Settings, *, distinct: int | None = None,
                 width: tuple[int, int] = (600, 1024), aspect: tuple[float, float] = (0.66, 0.75),
                 tasks: tuple[int, ...] = (1,)) -> tuple[str, list[str], float]:
    """An ISIC root under ``root`` whose Training input folder holds ``images`` synthetic JPEGs: ``distinct``
    (default all) drawn by ``kind: synth`` (Ray must be running), the rest copies of those under new ids.
    A root made earlier with the same arguments is reused as it is. Returns (input folder, image URIs sorted,
    seconds it took)."""
    start = time.perf_counter()
    distinct = min(distinct or images, images)
    inputs = storage.join(root, synth.SUBSET_FOLDERS["Training"][0])
    made = {"images": images, "distinct": distinct, "width": list(width), "aspect": list(aspect),
            "tasks": list(tasks)}
    marker = storage.join(root, "bench-images.json")
    if storage.exists(marker) and storage.read_text(marker) == repr(made):
        return inputs, sorted(f.uri for f in storage.list_files(inputs)), time.perf_counter() - start
    if storage.exists(root):
        storage.delete(root)
    from lesion_ray.spec import from_dict

    synth.run(from_dict(synth.SynthSpec, {"kind": "synth", "name": "bench", "output": root, "num_images": distinct,
                                          "validation_images": 0, "tasks": list(tasks), "width": list(width),
                                          "aspect": list(aspect)}, "bench"), settings)
    sources = sorted(f.uri for f in storage.list_files(inputs))
    copy_images(sources, inputs, images - distinct, first_id=distinct)
    storage.write_text(marker, repr(made))
    return inputs, sorted(f.uri for f in storage.list_files(inputs)), time.perf_counter() - start


# --- The GPU's busy share -----------------------------------------------------------------------------


class GpuBusy:
    """The GPU's utilisation (the share of time a kernel ran), sampled every ``every_s`` in a thread while in the
    ``with`` block: through NVML (``pynvml``, from nvidia-ml-py) if it imports, else from ``nvidia-smi
    --query-gpu=utilization.gpu -lms``, else not at all. ``source`` says which (and why not); ``samples`` holds
    (time.time(), share 0..1)."""

    def __init__(self, index: int = 0, every_s: float = 0.1) -> None:
        self.index, self.every_s = index, every_s
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        read = self._nvml() or self._nvidia_smi()
        if read:
            self._thread = threading.Thread(target=read, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._smi:
            self._smi.terminate()
            self._smi.wait()
        if self._thread:
            self._thread.join()

    def _nvml(self) -> Callable[[], None] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # not installed, or no driver
            self.source = f"none (pynvml: {type(exc).__name__}: {exc})"
            return None
        self.source = "NVML (pynvml)"

        def read() -> None:
            while not self._stop.is_set():
                self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100))
                self._stop.wait(self.every_s)

        return read

    def _nvidia_smi(self) -> Callable[[], None] | None:
        if not shutil.which("nvidia-smi"):
            self.source += "; no nvidia-smi either"
            return None
        self._smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.index),
             f"-lms={max(int(self.every_s * 1000), 50)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.source = "nvidia-smi -lms (pynvml missing)"

        def read() -> None:
            for line in self._smi.stdout:
                if line.strip().isdigit():
                    self.samples.append((time.time(), int(line) / 100))

        return read

    def share(self, windows: Iterable[tuple[float, float]] | None = None) -> float:
        """Mean busy share of the samples inside ``windows`` ((start, end) in time.time() seconds; None: all of
        them); NaN without samples."""
        spans = list(windows) if windows is not None else None
        values = [v for t, v in self.samples if spans is None or any(a <= t <= b for a, b in spans)]
        return sum(values) / len(values) if values else math.nan


# --- Result rows ------------------------------------------------------------------------------------------


def add_result_args(parser: argparse.ArgumentParser, step: str) -> None:
    """``--results FILE`` (rows appended for gpu_suite.sh's table) and ``--step NAME`` (their step column)."""
    parser.add_argument("--results", help="append step/metric/value/goal/met rows to this TSV file")
    parser.add_argument("--step", default=step, help=f"the step name in those rows (default {step})")


def fmt(value: Any) -> str:
    """A number with 4 significant digits (NaN as 'n/a'); anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return "n/a" if math.isnan(value) else f"{value:.4g}"


class Results:
    """Measured values, each with its goal and whether it was met, appended as TSV rows (step, metric, value,
    goal, met) to ``path`` when given (gpu_suite.sh prints them as its closing table), and printed."""

    COLUMNS = ("step", "metric", "value", "goal", "met")

    def __init__(self, path: str | None, step: str) -> None:
        self.path, self.step = path, step

    def add(self, metric: str, value: Any, goal: str = "", met: bool | None = None) -> None:
        verdict = "-" if met is None else ("yes" if met else "NO")
        print(f"  [result] {metric}: {fmt(value)}" + (f" (goal {goal}: {verdict})" if goal else ""), flush=True)
        if not self.path:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a") as f:
            for row in ([self.COLUMNS] if new else []) + [(self.step, metric, fmt(value), goal, verdict)]:
                f.write("\t".join(" ".join(str(cell).split()) for cell in row) + "\n")

    def at_least(self, metric: str, value: float, target: float, unit: str = "") -> bool:
        """Record ``value`` against the goal ``>= target``; NaN (not measured) is not met."""
        met = not math.isnan(value) and value >= target
        self.add(metric, value, f">= {fmt(target)}{unit}", met)
        return met

    def skipped(self, metric: str, why: str) -> None:
        self.add(metric, f"skipped: {why}")
