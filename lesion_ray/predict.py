"""``kind: predict``: batch inference over an image archive on Ray Data, streamed, resumable and accounted for.

The streaming pipeline (every stage runs at once, with Ray Data's backpressure):

1. the driver lists the input (:func:`lesion_ray.data.input_folder`: an ISIC root's input folder, or any
   folder of images) a page at a time, on S3 several key ranges side by side
   (:func:`lesion_ray.storage.iter_listing_parallel`), and sorts every object at once from its name and
   size (:func:`lesion_ray.data.triage`): images go into a queue as pages, the rest become rows at once;
2. read tasks take pages from the queue; CPU tasks read + decode + resize + scale
   (:func:`lesion_ray.preprocess.decoded`), so the model never waits on JPEG decoding; on one node as many
   at once as it has cores (:func:`lesion_ray.preprocess.task_pool`), and as many writing tasks (step 4);
3. :class:`Predictor` actors (``ActorPoolStrategy``; by default two per GPU at 0.5 GPU each on a cluster
   with GPUs, one per core on one CPU node: :func:`actor_layout`) load the model once each
   (``precision``, ``channels_last``, ``compile``: :class:`lesion_ray.inference.Runner`), scale the uint8
   rows on their device and return sigmoid probabilities at the model's resolution, plus both heads'
   attribute probabilities (optionally averaged over flips: ``tta``). With ``decode: gpu`` step 2 only reads
   bytes and the actors decode JPEGs with nvJPEG (:class:`lesion_ray.inference.ModelInputs`);
4. CPU tasks (:func:`lesion_ray.outputs.write_batch`) resize the probabilities back to the original image size,
   threshold them, keep a Task 1 mask's largest region with its holes filled (``postprocess``),
   encode 0/255 single-channel PNGs in the ISIC submission format
   (``masks/<id>_segmentation.png`` or ``masks/<id>_attribute_<name>.png``), optionally an
   input | mask | overlay PNG (``overlays/<id>_overlay.png``), and write their manifest rows as a
   part, so a run killed at any moment keeps every row it finished;
5. the driver streams the parts into ``manifest.parquet`` and ``skipped.csv`` (:mod:`lesion_ray.manifest`)
   and writes ``predict.json`` (the spec, the model and its settings, for evaluate's report).

Every listed object is accounted for: ok + error + skipped (+ other shards) = listed. An image is
``ok`` or ``error`` with the reason (unreadable, a second file with the same id, an unsupported
type, over ``max_bytes``); anything else is ``skipped``. The driver's memory does not grow with the
archive: its bookkeeping is an SQLite ledger on its local disk. With ``resume`` (the default) an image
is not done again when an earlier ``ok`` row from the same model, threshold and post-processing
stands and all the outputs it names exist. When the pipeline itself fails mid-run (an inference actor
or a node lost for good), the images not done yet are run again, up to :data:`ATTEMPTS` times.
``shard: K/N`` splits an archive between N jobs by a stable hash of the image id.

A run owns its output while it works: ``lock.json`` (owner, host, pid, start time), created only
if absent, so two runs never write into one folder. A crashed run's lock is taken over only with
``take_over_lock: true``. ``output`` may neither be ``input`` nor lie inside it or contain it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import getpass
import itertools
import json
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from ray.util.queue import Queue

from lesion_ray import data, feed, inference, manifest, outputs, preprocess, registry, report, storage
from lesion_ray.models import ModelConfig
from lesion_ray.postprocess import Postprocess
from lesion_ray.registry import ModelRef
from lesion_ray.settings import Settings
from lesion_ray.spec import InputUri, JobSpec, OutputUri, RegistryUri

LOCK_FILE = "lock.json"
ATTEMPTS = 3  # pipeline runs per job: the first, then reruns of what is left after a lost actor or node
# What a lost actor, worker or node raises out of a Ray Data execution: worth running the rest again.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError, feed.QueueLost)
# Logical memory reserved per inference actor: a process with torch, plus twice the weights.
ACTOR_BASE_MEMORY = 1024 * 1024 * 1024
# Inference actors on one CPU node by default, at most (one per core up to here; each holds torch and a model).
MAX_CPU_ACTORS = 8
# CPUs reserved per decoding task and per writing task: half a CPU each, so that on the CPUs the inference
# actors leave, decoding and writing run side by side instead of decoding taking every free CPU until the
# input is exhausted and every mask waiting for it.
STAGE_CPUS = 0.5


class PredictSpec(inference.ModelRuntime, JobSpec):
    kind: Literal["predict"] = "predict"
    input: InputUri
    model: ModelRef
    output: OutputUri
    registry: RegistryUri | None = Field(None, description="model registry for name@version (default: the cluster "
                                                           "config's registry, else runs/registry)")
    subset: Literal["Training", "Validation", "Test"] = Field(
        "Validation", description="which subset's images when input is an ISIC root")
    batch_size: int = Field(16, ge=1, description="images per forward pass (and per decode task)")
    min_actors: int = Field(1, ge=1, description="inference actors kept running")
    max_actors: int = Field(1, ge=1, description="inference actors at most (one model copy each)")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs reserved per inference actor; also its torch threads")
    gpus_per_actor: float | None = Field(None, ge=0.0, description=(
        "GPUs per inference actor; 0 runs the model on CPU (default: 0.5, with 2 actors per GPU, when the cluster "
        "has GPUs, else 0)"))
    decode: Literal["cpu", "gpu"] = Field("cpu", description=(
        "cpu: CPU tasks decode and resize; gpu: read tasks only move bytes and the inference actors decode JPEGs "
        "with nvJPEG on their GPU (needs torchvision there), anything else on their CPU"))
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="probability above which a pixel is in "
                                                                      "the mask (default: the model's own)")
    overlays: Literal["none", "sample", "all"] = Field(
        "sample", description="input | mask | overlay PNGs: none, the first overlay_sample images by id, or all")
    overlay_sample: int = Field(16, ge=1, description="how many images get an overlay with overlays: sample (per "
                                "run: a resumed run draws its own among the images it does)")
    tta: bool = Field(False, description="average the probabilities over the image and its horizontal/vertical flips")
    postprocess: Postprocess = Field(
        "largest_component", description="Task 1: largest_component keeps the largest region and fills its holes; "
                                         "none keeps the thresholded mask as it is")
    resume: bool = Field(True, description="skip inputs whose outputs a previous run with the same model finished")
    max_pixels: int = Field(preprocess.DEFAULT_MAX_PIXELS, ge=1, le=preprocess.LARGEST_MAX_PIXELS,
                            description="refuse larger images (decompression bombs)")
    take_over_lock: bool = Field(False, description="take over the output's lock.json left by a run that crashed")
    max_bytes: int = Field(data.DEFAULT_MAX_BYTES, ge=1, description="larger objects become error rows without "
                                                                      "being read")
    shard: str | None = Field(None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*$", description=(
        "K/N: this job's share of the input, by a stable hash of the image id (run N jobs, K = 1..N, each with "
        "its own output; `lesion-ray manifest` combines their manifests)"))

    @model_validator(mode="after")
    def _rules(self) -> PredictSpec:
        if self.shard and (share := _shard(self.shard))[0] > share[1]:
            raise PydanticCustomError("rule", f"K must be at most N in K/N, got {self.shard}", {"key": "shard"})
        if self.min_actors > self.max_actors:
            raise PydanticCustomError("rule", f"must be at most max_actors ({self.max_actors}), got {self.min_actors}",
                                      {"key": "min_actors"})
        # Predictions must never land on (or among) what they are made from, e.g. an archive's annotations.
        if storage.is_within(self.output, self.input) or storage.is_within(self.input, self.output):
            raise PydanticCustomError("rule", f"{self.output} is, contains or lies inside the input {self.input}: "
                                              "write predictions to a folder of their own", {"key": "output"})
        return self


SPEC = PredictSpec


# --- Inference ----------------------------------------------------------------------------------


class Predictor:
    """A Ray Data actor: the model loaded once (:class:`lesion_ray.inference.Runner`), then batches of
    preprocessed images (or, with ``decode``, encoded ones, decoded here) -> probabilities."""

    def __init__(self, model_dir: str, device: str, runtime: inference.ModelRuntime, tta: bool, threads: int,
                 batch_size: int, decode: bool, max_pixels: int) -> None:
        torch.set_num_threads(threads)
        loaded = registry.load_model(model_dir)
        self.channels, self.size = loaded.config.num_classes, loaded.config.input_size
        self.runner = inference.Runner(loaded.model, device, runtime, self.size, batch_size)
        self.inputs = inference.ModelInputs(device, self.size, max_pixels) if decode else None
        self.tta = tta
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        error, height, width = batch["error"], batch.get("orig_height"), batch.get("orig_width")
        if self.inputs:
            images, sizes, failed = self.inputs([bytes(blob) for blob in batch["data"]])
            error = np.where(error == "", np.array(failed, dtype=object), error)  # a read error stays the reason
            height, width = (np.array(side, np.int64) for side in zip(*sizes, strict=True))
        ok = error == ""
        count = len(ok)
        probs = np.zeros((count, self.channels, self.size, self.size), np.float16)
        head1 = np.zeros((count, self.channels), np.float32)
        head2 = np.zeros((count, self.channels), np.float32)
        if ok.any():
            # Boolean indexing copies: a writable tensor for torch.
            x = images[torch.from_numpy(ok).to(images.device)] if self.inputs else torch.from_numpy(batch["image"][ok])
            p, h1, h2 = self.runner(x, self.tta)
            probs[ok] = p.half().cpu().numpy()
            head1[ok], head2[ok] = h1.cpu().numpy(), h2.cpu().numpy()
        infer_ms = 1000 * (time.perf_counter() - start) / max(int(ok.sum()), 1)
        return {"id": batch["id"], "source": batch["source"], "error": error, "orig_height": height,
                "orig_width": width, "probs": probs, "head1": head1, "head2": head2,
                "infer_ms": np.where(ok, infer_ms, 0.0).astype(np.float32), "node": np.full(count, self.node)}


# --- The job ------------------------------------------------------------------------------------


class OutputLocked(RuntimeError):
    """Another run owns the output folder (or crashed while owning it)."""


@contextlib.contextmanager
def output_lock(out: str, job_name: str, take_over: bool) -> Iterator[dict[str, Any]]:
    """Own ``out`` for the duration of the block through ``lock.json``, created only if absent."""
    uri = storage.join(out, LOCK_FILE)
    lock = {"owner": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(), "job": job_name,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # Sortable by time: a later run's manifest parts sort after an earlier run's.
            "run_id": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f-") + uuid.uuid4().hex[:8]}
    body = json.dumps(lock, indent=2).encode()
    if not storage.create_exclusive(uri, body) and (holder := _lock_holder(uri, lock["run_id"])):
        if not take_over:
            raise OutputLocked(
                f"{out} is in use by {holder} ({uri}). Wait for it to finish; if that run crashed, run again with "
                "take_over_lock=true to take over its lock and resume its work.")
        report.info(f"taking over the lock of {holder} (take_over_lock)")
        storage.write_bytes(uri, body)
    try:
        yield lock
    finally:
        with contextlib.suppress(storage.StorageError, ValueError):
            # Only our own lock: a run that took it over meanwhile keeps it.
            if json.loads(storage.read_text(uri)).get("run_id") == lock["run_id"]:
                storage.delete(uri)


def _lock_holder(uri: str, run_id: str) -> str | None:
    """Who holds the lock at ``uri``, in words; None when it is ``run_id``'s own (a PUT that went
    through but whose answer was lost, so the retry found the object)."""
    try:
        held = json.loads(storage.read_text(uri))
    except (storage.StorageError, ValueError):
        return "an unknown run (its lock is unreadable)"
    if held.get("run_id") == run_id:
        return None
    return (f"{held.get('job', '?')} run by {held.get('owner', '?')} on {held.get('host', '?')} "
            f"(pid {held.get('pid', '?')}) since {held.get('started_at', '?')}")


def _shard(text: str) -> tuple[int, int]:
    k, n = text.split("/")
    return int(k), int(n)


def in_shard(image_id: str, shard: tuple[int, int] | None) -> bool:
    """Whether ``image_id`` belongs to share K of N (a CRC-32 of the id: the same in every process)."""
    return shard is None or zlib.crc32(image_id.encode()) % shard[1] == shard[0] - 1


@dataclass
class _RunCounts:
    """A run's counts over its listings (one per attempt): objects in other shards (the most any listing
    saw), earlier rows that stand, and a few error examples."""

    other_shards: int = 0
    resumed: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, errors: Iterable[str]) -> None:
        self.examples += itertools.islice(errors, max(0, 3 - len(self.examples)))


def _work(spec: PredictSpec, folder: str, ledger: manifest.Ledger, model: manifest.Model, out: str, run_id: str,
          counts: _RunCounts) -> Iterator[list[tuple[str, str]]]:
    """The images to predict on, ``(id, source)`` a listing page at a time, as the listing goes. On the way
    the ledger admits every object of this shard; the rows of the objects refused or skipped are written
    as a part per page, and the objects whose earlier rows stand are recorded as done."""
    shard = _shard(spec.shard) if spec.shard else None
    others = 0
    for page in storage.iter_listing_parallel(folder):
        ours = [(image_id, f) for f in page if in_shard(image_id := data.sample_id(f.uri), shard)]
        others += len(page) - len(ours)
        counts.other_shards = max(counts.other_shards, others)
        verdicts = {f.uri: data.triage(f, spec.max_bytes) for _, f in ours}
        # Only images to predict on share ids: a mask or a .tif beside ISIC_0000001.jpg is not its duplicate.
        admitted = ledger.admit([(image_id, f.uri, verdicts[f.uri] is None) for image_id, f in ours])
        refused, work, standing = [], [], collections.defaultdict(list)
        for image_id, source, first, earlier in admitted:
            verdict = verdicts[source] or ((manifest.ERROR, f"duplicate id {image_id}: also {first}") if first
                                           else None)
            if verdict:
                refused.append((image_id, source, *verdict))
            elif earlier is not None:
                standing[earlier].append((source, manifest.OK))
            else:
                work.append((image_id, source))
        for earlier, done in standing.items():
            ledger.record(done, earlier)
        counts.resumed += sum(map(len, standing.values()))
        if refused:
            _write_refused(refused, ledger, model, out, run_id)
            counts.note(f"{i}: {reason}" for i, _, status, reason in refused if status == manifest.ERROR)
        if work:
            yield work


def _write_refused(rows: list[tuple[str, str, str, str]], ledger: manifest.Ledger, model: manifest.Model, out: str,
                   run_id: str) -> None:
    """Rows of objects that never reach the pipeline, ``(id, source, status, reason)``, as a part of their own."""
    part = outputs.part_uri(out, run_id)
    manifest.write_part(part, manifest.refused_rows(rows, model))
    ledger.record([(source, status) for _, source, status, _ in rows], part)


def _pipeline(spec: PredictSpec, queue: Queue, found: registry.Resolved, config: ModelConfig, out: str,
              threshold: float, overlay_ids: set[str] | None, run_id: str) -> ray.data.Dataset:
    weights_bytes = storage.file_size(found.model_file) or 0
    ds = feed.dataset(queue, spec.batch_size)
    # A read task's output is one block: split it into batches, streamed, so that decoding runs in parallel
    # tasks and every inference actor gets work.
    ds = ds.repartition(target_num_rows_per_block=spec.batch_size)
    if spec.decode == "gpu":
        ds = preprocess.fetched(ds, batch_size=spec.batch_size, num_cpus=STAGE_CPUS)
    else:
        ds = preprocess.decoded(ds, size=config.input_size, max_pixels=spec.max_pixels, batch_size=spec.batch_size,
                                device="cpu", num_cpus=STAGE_CPUS)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": found.model_dir, "device": "cuda" if spec.gpus_per_actor else "cpu",
                               "runtime": spec, "tta": spec.tta, "threads": spec.cpus_per_actor,
                               "batch_size": spec.batch_size, "decode": spec.decode == "gpu",
                               "max_pixels": spec.max_pixels},
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
        # No actor restarts (Ray Data's default is unlimited): the pool's constructor arguments are object
        # store refs, which a restart cannot rely on (ray-project/ray#53727; Ray warns about it for each
        # actor). A lost actor fails the pass and _run_attempts reruns what is not done.
        max_restarts=0,
        num_cpus=spec.cpus_per_actor,
        # Memory for torch and the weights, so that Ray puts no more actors on a node than it holds. Decoding is
        # never fused into these actors (it must run in parallel tasks, not between forward passes): Ray Data
        # fuses operators only when their remote args are identical, and STAGE_CPUS differs from these.
        memory=ACTOR_BASE_MEMORY + 2 * weights_bytes,
        **({"num_gpus": spec.gpus_per_actor} if spec.gpus_per_actor else {}),
    )
    writing = {"out": out, "task": config.task, "threshold": threshold, "postprocess": spec.postprocess,
               "overlay_ids": overlay_ids, "model_name": found.name, "model_version": found.version,
               "max_pixels": spec.max_pixels, "run_id": run_id}
    return ds.map_batches(outputs.write_batch, batch_size=spec.batch_size, num_cpus=STAGE_CPUS,
                          compute=preprocess.task_pool(), fn_kwargs=writing)


def _collect(passes: Callable[[], ray.data.Dataset], feeder: threading.Thread, ledger: manifest.Ledger,
             window: feed.Window, nodes: set[str], counts: _RunCounts) -> Iterator[int]:
    """Run pipeline passes, recording their rows in the ledger, until the listing has ended and every image
    it gave is back; yields once per image (progress)."""
    while True:
        with contextlib.closing(iter(passes().iter_batches(batch_format="pyarrow", batch_size=None))) as tables:
            returned = yield from _record(tables, feeder, ledger, window, nodes, counts)
        listing = feeder.is_alive()
        if not window.in_flight and not listing:
            return  # every image listed is back
        if window.in_flight > window.unread_at_most() or not (returned or listing):
            return  # images that a pass took never came back: the caller reruns them
        # The pass's read tasks ran out before the listing did: another pass reads on from the queue.


def _record(tables: Iterator[pa.Table], feeder: threading.Thread, ledger: manifest.Ledger, window: feed.Window,
            nodes: set[str], counts: _RunCounts) -> Generator[int, None, int]:
    """One pass's rows into the ledger, until the listing has ended and every image it gave is back; yields
    once per image, returns how many came back."""
    returned = 0
    for table in tables:
        window.leave(len(table))
        for part in set(table["part"].to_pylist()):
            rows = table.filter(pc.equal(table["part"], part)).to_pylist()
            ledger.record([(r["source"], r["status"]) for r in rows], part)
            counts.note(f"{data.sample_id(r['source'])}: {r['error']}" for r in rows if r["error"])
        nodes.update(n for n in table["node"].to_pylist() if n)
        yield from range(len(table))
        returned += len(table)
        if not window.in_flight and not feeder.is_alive():
            break  # the read tasks still to start would only find the end mark
    return returned


def run(spec: PredictSpec, settings: Settings) -> dict[str, Any]:
    out = storage.normalize(spec.output)
    with output_lock(out, spec.name, spec.take_over_lock) as lock:
        ledger = manifest.Ledger()
        try:
            return _predict(spec, out, lock["run_id"], spec.registry or settings.registry, ledger)
        finally:
            ledger.close()


def _predict(spec: PredictSpec, out: str, run_id: str, registry_uri: str, ledger: manifest.Ledger) -> dict[str, Any]:
    found = registry.resolve(spec.model, registry_uri)
    config, model_threshold = registry.read_config(found.model_dir)
    threshold = model_threshold if spec.threshold is None else spec.threshold
    model = manifest.Model(found.name, found.version, threshold, spec.postprocess)
    cpus = ray.cluster_resources().get("CPU", 0)
    spec = actor_layout(spec, preprocess.cluster_gpus(), preprocess.one_node_cores(), cpus)
    report.info(describe_layout(spec))
    if spec.min_actors * spec.cpus_per_actor >= cpus:
        report.info(f"warning: {spec.min_actors} actor(s) x {spec.cpus_per_actor} CPU(s) take all {cpus:g} CPUs "
                    "of the cluster and leave none to decode images: lower min_actors or cpus_per_actor unless "
                    "the cluster will grow")
    folder = data.input_folder(spec.input, spec.subset)
    if spec.resume:
        if standing := ledger.load_earlier(out, model):
            report.info(f"{standing} images of an earlier run stand (resume)")
    else:
        storage.delete(storage.join(out, manifest.PARTS_DIR))
    report.info(f"predicting on the images under {folder} with {found.name}@{found.version}"
                + (f", shard {spec.shard}" if spec.shard else ""))

    start = time.perf_counter()
    counts, nodes = _run_attempts(spec, folder, ledger, model, out, run_id, found, config)
    seconds = time.perf_counter() - start
    rows, skipped_rows = ledger.combine(out)
    record = {"spec": spec.model_dump(mode="json"),
              "model": {"name": found.name, "version": found.version, "uri": found.model_dir},
              "threshold": threshold, "postprocess": spec.postprocess,
              "manifest": storage.join(out, manifest.MANIFEST_FILE)}
    storage.write_text(storage.join(out, outputs.PREDICT_RECORD), json.dumps(record, indent=2))

    status = ledger.counts()
    ok, errors, skipped = (status.get(s, 0) for s in (manifest.OK, manifest.ERROR, manifest.SKIPPED))
    listed = sum(status.values()) + counts.other_shards
    if status.get(None) or (rows, skipped_rows) != (ok + errors, skipped):
        raise RuntimeError(f"{listed} objects listed: {ok} ok, {errors} error, {skipped} skipped, "
                           f"{counts.other_shards} in other shards and {status.get(None, 0)} not done, but the "
                           f"manifest has {rows} rows and the skipped list {skipped_rows}: please report this bug")
    if not ok + errors:
        raise ValueError(f"no images ({', '.join(data.IMAGE_SUFFIXES)}) found under {folder}"
                         + (f" in shard {spec.shard}" if spec.shard else ""))
    if errors:
        report.info(f"{errors} inputs failed" + (", e.g. " + "; ".join(counts.examples) if counts.examples else "")
                    + f"; each with its reason in {storage.join(out, manifest.MANIFEST_FILE)} (status error)")
    done = ok + errors - counts.resumed
    summary = {
        "listed": listed,
        "inputs": ok + errors,
        "ok": ok,
        "error": errors,
        "skipped": skipped,
        "resumed": counts.resumed,
        "inference_nodes": len(nodes),
        "images_per_s": round(done / seconds, 2) if done else 0.0,
        "model": f"{found.name}@{found.version}",
        "threshold": threshold,
        "postprocess": spec.postprocess,
        "masks": storage.join(out, outputs.MASKS_DIR),
        "overlays": storage.join(out, outputs.OVERLAYS_DIR) if spec.overlays != "none" else "none",
        "manifest": storage.join(out, manifest.MANIFEST_FILE),
        "skipped_list": storage.join(out, manifest.SKIPPED_FILE),
    }
    if spec.shard:
        summary["shard"], summary["other_shards"] = spec.shard, counts.other_shards
    return summary


def actor_layout(spec: PredictSpec, gpus: int, cores: int | None, cpus: float) -> PredictSpec:
    """``spec`` with its inference actors placed: without ``gpus_per_actor``, 2 actors per GPU at 0.5 GPU each
    when the cluster has GPUs (measured best: one actor's forward pass overlaps the other's copies and
    post-processing), else on CPUs: on one node with ``cores`` cores one actor per ``cpus_per_actor`` of them,
    at most :data:`MAX_CPU_ACTORS` and leaving of Ray's ``cpus`` enough for a decoding and a writing task
    (the forward pass is about half an image's CPU time, and one-thread actors side by side beat threads in
    one actor), on several nodes one; actor counts a spec names are kept."""
    layout: dict[str, Any] = {}
    if spec.gpus_per_actor is None:
        layout["gpus_per_actor"] = 0.5 if gpus else 0.0
    if layout.get("gpus_per_actor", spec.gpus_per_actor):
        default = 2 * gpus if layout else None  # a spec that names gpus_per_actor names its actors too
    else:
        free = int((cpus - 2 * STAGE_CPUS) // spec.cpus_per_actor)  # e.g. 8 cores: 7 of the embedded Ray's 8 CPUs
        default = max(1, min(MAX_CPU_ACTORS, cores // spec.cpus_per_actor, free)) if cores else None
    named = spec.model_fields_set
    if default:
        layout["max_actors"] = spec.max_actors if "max_actors" in named else max(default, spec.min_actors)
        layout["min_actors"] = spec.min_actors if "min_actors" in named else min(default, layout["max_actors"])
    spec = spec.model_copy(update=layout)
    if spec.gpus_per_actor > gpus:
        raise ValueError(f"gpus_per_actor is {spec.gpus_per_actor} but the Ray cluster has {gpus} GPUs: set "
                         "gpus_per_actor: 0 to predict on CPUs")
    return spec


def describe_layout(spec: PredictSpec) -> str:
    """One line on the inference actors of a placed ``spec`` (:func:`actor_layout`)."""
    actors = str(spec.max_actors) if spec.min_actors == spec.max_actors else f"{spec.min_actors}-{spec.max_actors}"
    where = f"{spec.gpus_per_actor:g} GPU" if spec.gpus_per_actor else f"{spec.cpus_per_actor} CPU"
    return (f"inference: {actors} actor(s) x {where}, {spec.precision}"
            + (", channels_last" if spec.channels_last else "") + (", compiled" if spec.compile else "")
            + (f", decoding on the {'GPU' if spec.gpus_per_actor else 'CPU'} in the actors"
               if spec.decode == "gpu" else ""))


def _run_attempts(spec: PredictSpec, folder: str, ledger: manifest.Ledger, model: manifest.Model, out: str,
                  run_id: str, found: registry.Resolved, config: ModelConfig) -> tuple[_RunCounts, set[str]]:
    """Stream the listing through the pipeline; when an actor, a node or a reader is lost for good, list
    again and run what is not done. After the last attempt the listing is finished without the pipeline and
    the images still left become error rows, so that the manifest accounts for every object and a later run
    retries them."""
    counts, nodes = _RunCounts(), set()
    reason = ""
    for attempt in range(1, ATTEMPTS + 1):
        pages = _work(spec, folder, ledger, model, out, run_id, counts)
        overlay_ids: set[str] | None = None if spec.overlays == "all" else set()
        if spec.overlays == "sample":  # the first images by id among the first pages listed
            head = _first_pages(pages, spec.overlay_sample)
            overlay_ids = set(sorted(i for page in head for i, _ in page)[: spec.overlay_sample])
            pages = itertools.chain(head, pages)
        queue, window = feed.new_queue(), feed.Window()
        stop, failures = threading.Event(), []
        feeder = threading.Thread(target=feed.fill, args=(pages, queue, window, stop, failures), name="listing",
                                  daemon=True)
        feeder.start()
        try:
            passes = functools.partial(_pipeline, spec, queue, found, config, out, model.threshold, overlay_ids,
                                       run_id)
            for _ in report.progress(_collect(passes, feeder, ledger, window, nodes, counts), None, "predicted"):
                pass
            stop.set()  # a feeder still running waits for images that are lost: it ends, and the pass is rerun
            feeder.join()
            if failures:
                raise failures[0]
            if not (left := ledger.to_do()):
                return counts, nodes
            reason = f"{left} images listed but not returned by the pipeline"
        except LOST as exc:
            cause = getattr(exc, "cause", None) or exc  # a task's error: what it raised, not Ray's traceback
            reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        finally:
            stop.set()
            feeder.join(timeout=60)  # it stops at its next page: the ledger and the output stay this run's
            with contextlib.suppress(Exception):  # never in the way of the error that ended the pass
                ray.kill(queue.actor)
        if attempt < ATTEMPTS:
            report.info(f"warning: the pipeline failed ({reason}); running the images not done yet again "
                        f"(attempt {attempt + 1} of {ATTEMPTS})")
    report.info(f"the pipeline failed {ATTEMPTS} times ({reason}); listing the rest of the input to record the "
                "images not done as not processed: run again to retry them")
    # The failed passes' listing stopped up to feed.LEAD images ahead of the pipeline: list again to the end,
    # then take what the ledger still holds (objects listed before that are gone since).
    for page in itertools.chain(_work(spec, folder, ledger, model, out, run_id, counts), ledger.pending()):
        _write_refused([(i, s, manifest.ERROR, f"not processed: the pipeline failed: {reason}") for i, s in page],
                       ledger, model, out, run_id)
    return counts, nodes


def _first_pages(pages: Iterator[list[tuple[str, str]]], images: int) -> list[list[tuple[str, str]]]:
    """Pages from ``pages`` until they hold ``images`` images (or the listing ends)."""
    head: list[list[tuple[str, str]]] = []
    while sum(map(len, head)) < images and (page := next(pages, None)) is not None:
        head.append(page)
    return head
