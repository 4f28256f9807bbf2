"""``kind: predict``: batch inference over an image archive on Ray Data, resumable and accounted for.

The streaming pipeline (every stage runs concurrently, with Ray Data's backpressure):

1. list the inputs once (:func:`lesion_ray.data.discover`: an ISIC root, an input folder or any
   folder of images) and the output folder once (resume);
2. read + decode + resize + scale in CPU tasks (:func:`lesion_ray.preprocess.image_dataset`), so
   the model never waits on JPEG decoding while there are CPUs to decode;
3. :class:`Predictor` actors (``ActorPoolStrategy``; ``num_gpus`` when ``gpus_per_actor`` > 0)
   load the model once each and return sigmoid probabilities at the model's resolution, plus
   both heads' attribute probabilities (optionally averaged over flips: ``tta``);
4. CPU tasks (:func:`write_batch`) resize the probabilities back to the original image size,
   threshold them, keep a Task 1 mask's largest region with its holes filled (``postprocess``),
   encode 0/255 single-channel PNGs in the ISIC submission format
   (``masks/<id>_segmentation.png`` or ``masks/<id>_attribute_<name>.png``), optionally an
   input | mask | overlay PNG (``overlays/<id>_overlay.png``), and return one manifest row each;
   and write them as a part file in ``manifest_parts/`` next to the masks, so a run killed at
   any moment keeps every row it finished;
5. the driver collects the rows into ``manifest.parquet`` (see :data:`MANIFEST_SCHEMA`), drops
   the parts and writes ``predict.json`` (the spec, the model and its settings, for evaluate's
   report).

Every input ends as exactly one manifest row, ``ok`` or ``error`` with the reason. With
``resume`` (the default) an input is skipped when an earlier ``ok`` row from the same model,
threshold and post-processing exists and all the outputs it names are in the output listing; its
row is kept. When the pipeline itself fails mid-run (an inference actor or a node lost for good),
the images not done yet are run again, up to :data:`ATTEMPTS` times.

A run owns its output while it works: ``lock.json`` (owner, host, pid, start time), created only
if absent, so two runs never write into one folder. A crashed run's lock is taken over only with
``take_over_lock: true``. ``output`` may neither be ``input`` nor lie inside it or contain it.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lesion_ray import data, inference, preprocess, registry, report, storage
from lesion_ray.inference import Postprocess
from lesion_ray.models import ModelConfig
from lesion_ray.registry import ModelRef
from lesion_ray.settings import Settings
from lesion_ray.spec import InputUri, JobSpec, OutputUri, RegistryUri

MANIFEST_FILE = "manifest.parquet"
PARTS_DIR = "manifest_parts"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
LOCK_FILE = "lock.json"
PREDICT_RECORD = "predict.json"
ATTEMPTS = 3  # pipeline runs per job: the first, then reruns of what is left after a lost actor or node
# What a lost actor, worker or node raises out of a Ray Data execution: worth running the rest again.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError)
OVERLAY_HEIGHT = 256
# Logical memory reserved per inference actor: a process with torch, plus twice the weights.
ACTOR_BASE_MEMORY = 1024 * 1024 * 1024

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("status", pa.string()),  # "ok" or "error"
    ("error", pa.string()),  # "" when ok
    ("masks", pa.list_(pa.string())),  # output URIs: one (Task 1) or five in data.ATTRIBUTES order (Task 2)
    ("overlay", pa.string()),  # "" when none was written
    ("height", pa.int32()),  # original image size (0 when the image could not be decoded)
    ("width", pa.int32()),
    ("area_fraction", pa.list_(pa.float32())),  # share of mask pixels, per channel
    ("head1_prob", pa.list_(pa.float32())),  # attribute/lesion presence, head 1 (pooled centre block)
    ("head2_prob", pa.list_(pa.float32())),  # head 2 (max of the mask logits)
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("threshold", pa.float64()),
    ("postprocess", pa.string()),  # null in manifests from before the key existed: those rows are redone
    ("infer_ms", pa.float32()),  # this image's share of its batch's forward pass
    ("write_ms", pa.float32()),  # resize + threshold + encode + write
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("node", pa.string()),  # the Ray node id of the inference actor that handled the row
])


class PredictSpec(JobSpec):
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
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per inference actor; 0 runs the model on CPU")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="probability above which a pixel is in "
                                                                      "the mask (default: the model's own)")
    overlays: Literal["none", "sample", "all"] = Field(
        "sample", description="input | mask | overlay PNGs: none, the first overlay_sample images by id, or all")
    overlay_sample: int = Field(16, ge=1, description="how many images get an overlay with overlays: sample")
    tta: bool = Field(False, description="average the probabilities over the image and its horizontal/vertical flips")
    postprocess: Postprocess = Field(
        "largest_component", description="Task 1: largest_component keeps the largest region and fills its holes; "
                                         "none keeps the thresholded mask as it is")
    resume: bool = Field(True, description="skip inputs whose outputs a previous run with the same model finished")
    max_pixels: int = Field(preprocess.DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images (decompression "
                                                                             "bombs)")
    take_over_lock: bool = Field(False, description="take over the output's lock.json left by a run that crashed")

    @model_validator(mode="after")
    def _rules(self) -> PredictSpec:
        if self.min_actors > self.max_actors:
            raise PydanticCustomError("rule", f"must be at most max_actors ({self.max_actors}), got {self.min_actors}",
                                      {"key": "min_actors"})
        # Predictions must never land on (or among) what they are made from, e.g. an archive's annotations.
        if storage.is_within(self.output, self.input) or storage.is_within(self.input, self.output):
            raise PydanticCustomError("rule", f"{self.output} is, contains or lies inside the input {self.input}: "
                                              "write predictions to a folder of their own", {"key": "output"})
        return self


SPEC = PredictSpec


def mask_names(image_id: str, task: int) -> list[str]:
    """The ISIC submission file names of one image's masks."""
    if task == 1:
        return [f"{image_id}_segmentation.png"]
    return [f"{image_id}_attribute_{name}.png" for name in data.ATTRIBUTES]


# --- Inference ----------------------------------------------------------------------------------


class Predictor:
    """A Ray Data actor: the model loaded once, then batches of preprocessed images -> probabilities."""

    def __init__(self, model_dir: str, device: str, tta: bool, threads: int) -> None:
        torch.set_num_threads(threads)
        self.loaded = registry.load_model(model_dir, device=device)
        self.device = device
        self.tta = tta
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        count, channels, size = len(ok), self.loaded.config.num_classes, self.loaded.config.input_size
        probs = np.zeros((count, channels, size, size), np.float16)
        head1 = np.zeros((count, channels), np.float32)
        head2 = np.zeros((count, channels), np.float32)
        start = time.perf_counter()
        if ok.any():
            images = torch.from_numpy(batch["image"][ok]).to(self.device)  # boolean indexing copied it
            p, h1, h2 = inference.forward(self.loaded.model, images, self.tta)
            probs[ok] = p.half().cpu().numpy()
            head1[ok], head2[ok] = h1.float().cpu().numpy(), h2.float().cpu().numpy()
        infer_ms = 1000 * (time.perf_counter() - start) / max(int(ok.sum()), 1)
        out = {k: batch[k] for k in ("id", "source", "error", "orig_height", "orig_width")}
        out.update(probs=probs, head1=head1, head2=head2, infer_ms=np.where(ok, infer_ms, 0.0).astype(np.float32),
                   node=np.full(count, self.node))
        return out


# --- Writing outputs ------------------------------------------------------------------------------


def overlay_png(image: np.ndarray, masks: np.ndarray) -> bytes:
    """input | mask | overlay, side by side at :data:`OVERLAY_HEIGHT`; masks are bool [C, H, W]."""
    height = min(OVERLAY_HEIGHT, masks.shape[1])
    width = max(1, round(masks.shape[2] * height / masks.shape[1]))
    picture = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    small = np.stack([np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
                      for mask in masks])
    # Task 1: a white mask (as the tutorial shows it); Task 2: each attribute in its overlay colour.
    painted = np.zeros_like(picture)
    colours = [(255, 255, 255)] if len(masks) == 1 else inference.OVERLAY_COLOURS[2]
    for mask, colour in zip(small, colours, strict=True):
        painted[mask] = colour
    panel = np.concatenate([picture, painted, inference.tint(picture, small)], axis=1)
    out = io.BytesIO()
    Image.fromarray(panel, "RGB").save(out, format="PNG")
    return out.getvalue()


def _write_one(row: dict[str, Any], out: str, task: int, threshold: float, postprocess: Postprocess,
               overlay: bool, max_pixels: int) -> tuple[list[str], str, list[float]]:
    """Write one image's masks (and overlay); returns (mask URIs, overlay URI, area fractions)."""
    masks = inference.to_masks(row["probs"], int(row["orig_height"]), int(row["orig_width"]), threshold,
                               postprocess)
    uris = [storage.join(out, MASKS_DIR, name) for name in mask_names(str(row["id"]), task)]
    for uri, mask in zip(uris, masks, strict=True):
        storage.write_bytes(uri, inference.mask_png(mask))
    overlay_uri = ""
    if overlay:
        image, _ = preprocess.decode_image(storage.read_bytes(str(row["source"])), max_pixels=max_pixels,
                                           target=OVERLAY_HEIGHT)
        overlay_uri = storage.join(out, OVERLAYS_DIR, f"{row['id']}_overlay.png")
        storage.write_bytes(overlay_uri, overlay_png(image, masks))
    return uris, overlay_uri, [float(m.mean()) for m in masks]


def write_batch(batch: dict[str, np.ndarray], out: str, task: int, threshold: float, postprocess: Postprocess,
                overlay_ids: set[str] | None, model_name: str, model_version: str, max_pixels: int,
                run_id: str) -> pa.Table:
    """Ray Data operator: probabilities -> mask files + one manifest row per image (errors included),
    the rows also written as a manifest part, so they survive the driver.

    ``overlay_ids``: the images that get an overlay; None for all of them.
    """
    rows = []
    for i in range(len(batch["id"])):
        row = {k: batch[k][i] for k in batch}
        image_id, error = str(row["id"]), str(row["error"])
        start = time.perf_counter()
        uris, overlay_uri, areas = [], "", []
        if not error:
            try:
                overlay = overlay_ids is None or image_id in overlay_ids
                uris, overlay_uri, areas = _write_one(row, out, task, threshold, postprocess, overlay,
                                                      max_pixels)
            except Exception as exc:  # one failed write must not lose the rest of the batch
                error, uris, overlay_uri, areas = f"writing outputs failed: {type(exc).__name__}: {exc}", [], "", []
        rows.append({
            "id": image_id,
            "source": str(row["source"]),
            "status": "error" if error else "ok",
            "error": error,
            "masks": uris,
            "overlay": overlay_uri,
            "height": int(row["orig_height"]),
            "width": int(row["orig_width"]),
            "area_fraction": areas,
            "head1_prob": row["head1"].tolist() if not error else [],
            "head2_prob": row["head2"].tolist() if not error else [],
            "model_name": model_name,
            "model_version": model_version,
            "threshold": threshold,
            "postprocess": postprocess,
            "infer_ms": float(row["infer_ms"]),
            "write_ms": 1000 * (time.perf_counter() - start),
            "finished_at": datetime.now(timezone.utc),
            "node": str(row["node"]),
        })
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    # Named by run, so a later run's rows sort after an earlier run's (read_manifest keeps the newest).
    _write_parquet(storage.join(out, PARTS_DIR, f"part-{run_id}-{uuid.uuid4().hex}.parquet"), table)
    return table


# --- Manifest and resume ------------------------------------------------------------------------


def _read_parquet(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), schema=MANIFEST_SCHEMA)


def read_manifest(out: str, listing: set[str]) -> pa.Table:
    """Every row an earlier run recorded under ``out``, the newest row per id (parts after the manifest)."""
    uris = [u for u in sorted(listing) if u.endswith(".parquet") and storage.parent(u) == storage.join(out, PARTS_DIR)]
    if storage.join(out, MANIFEST_FILE) in listing:
        uris.insert(0, storage.join(out, MANIFEST_FILE))
    if not uris:
        return MANIFEST_SCHEMA.empty_table()
    return _newest_per_id(pa.concat_tables([_read_parquet(u) for u in uris]))


def _newest_per_id(table: pa.Table) -> pa.Table:
    """The last row of each id (rows come oldest first)."""
    newest = {image_id: i for i, image_id in enumerate(table["id"].to_pylist())}
    return table.take(sorted(newest.values()))


def finished_rows(previous: pa.Table, listing: set[str], ids: set[str], model_name: str, model_version: str,
                  threshold: float, postprocess: Postprocess) -> pa.Table:
    """The earlier rows that stand: ok, same model, threshold and post-processing, an input now, all outputs
    present."""
    keep = []
    for i, row in enumerate(previous.select(["id", "status", "masks", "overlay", "model_name", "model_version",
                                             "threshold", "postprocess"]).to_pylist()):
        outputs = row["masks"] + ([row["overlay"]] if row["overlay"] else [])
        if (row["status"] == "ok" and row["id"] in ids and row["model_name"] == model_name
                and row["model_version"] == model_version and row["threshold"] == threshold
                and row["postprocess"] == postprocess and all(u in listing for u in outputs)):
            keep.append(i)
    return previous.take(pa.array(keep, pa.int64()))


def _write_parquet(uri: str, table: pa.Table) -> None:
    with storage.open_write(uri) as f:
        pq.write_table(table, f)


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


def _plan(out: str, samples: list[data.Sample], model_name: str, model_version: str,
          threshold: float, postprocess: Postprocess) -> tuple[pa.Table, list[data.Sample]]:
    """(the earlier rows that stand, the samples still to do), from the manifest, its parts and the outputs."""
    listing = {f.uri for f in storage.list_files(out)} if storage.exists(out) else set()
    kept = finished_rows(read_manifest(out, listing), listing, {s.id for s in samples}, model_name, model_version,
                         threshold, postprocess)
    done = set(kept["id"].to_pylist())
    return kept, [s for s in samples if s.id not in done]


def _collect(ds: ray.data.Dataset, tables: list[pa.Table]) -> Iterator[int]:
    """Run the pipeline, appending its manifest rows to ``tables``; yields once per image (progress)."""
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(table)
        yield from range(len(table))


def _pipeline(spec: PredictSpec, todo: list[data.Sample], found: registry.Resolved, config: ModelConfig, out: str,
              threshold: float, overlay_ids: set[str] | None, run_id: str) -> ray.data.Dataset:
    weights_bytes = storage.file_size(found.model_file) or 0
    ds = preprocess.image_dataset(todo, size=config.input_size, max_pixels=spec.max_pixels,
                                  batch_size=spec.batch_size, device="cpu")
    device = "cuda" if spec.gpus_per_actor > 0 else "cpu"
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_dir": found.model_dir, "device": device, "tta": spec.tta,
                               "threads": spec.cpus_per_actor},
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=spec.min_actors, max_size=spec.max_actors),
        # No actor restarts (Ray Data's default is unlimited): the pool's constructor arguments are object
        # store refs, which a restart cannot rely on (ray-project/ray#53727; Ray warns about it for each
        # actor). A lost actor fails the pass and _run_attempts reruns what is not done.
        max_restarts=0,
        num_cpus=spec.cpus_per_actor,
        # A memory reservation, which the decode tasks lack, also keeps Ray Data from fusing decoding
        # into these actors (it fuses operators only when their remote args are identical): decoding
        # must run in parallel CPU tasks, not between forward passes.
        memory=ACTOR_BASE_MEMORY + 2 * weights_bytes,
        **({"num_gpus": spec.gpus_per_actor} if spec.gpus_per_actor > 0 else {}),
    )
    return ds.map_batches(write_batch, batch_size=spec.batch_size, fn_kwargs={
        "out": out, "task": config.task, "threshold": threshold, "postprocess": spec.postprocess,
        "overlay_ids": overlay_ids, "model_name": found.name, "model_version": found.version,
        "max_pixels": spec.max_pixels, "run_id": run_id})


def _not_done_rows(todo: list[data.Sample], reason: str, found: registry.Resolved, threshold: float) -> pa.Table:
    """Error rows for samples no pipeline pass reached, so the manifest still accounts for them."""
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist([{
        "id": s.id, "source": s.image, "status": "error", "error": reason, "masks": [], "overlay": "", "height": 0,
        "width": 0, "area_fraction": [], "head1_prob": [], "head2_prob": [], "model_name": found.name,
        "model_version": found.version, "threshold": threshold, "infer_ms": 0.0, "write_ms": 0.0,
        "finished_at": now, "node": ""} for s in todo], schema=MANIFEST_SCHEMA)


def run(spec: PredictSpec, settings: Settings) -> dict[str, Any]:
    out = storage.normalize(spec.output)
    with output_lock(out, spec.name, spec.take_over_lock) as lock:
        return _predict(spec, out, lock["run_id"], spec.registry or settings.registry)


def _predict(spec: PredictSpec, out: str, run_id: str, registry_uri: str) -> dict[str, Any]:
    found = registry.resolve(spec.model, registry_uri)
    config, model_threshold = registry.read_config(found.model_dir)
    threshold = model_threshold if spec.threshold is None else spec.threshold
    if spec.gpus_per_actor > 0 and (gpus := preprocess.cluster_gpus()) < spec.gpus_per_actor:
        raise ValueError(f"gpus_per_actor is {spec.gpus_per_actor} but the Ray cluster has "
                         f"{gpus} GPUs: set gpus_per_actor: 0 to predict on CPUs")

    cpus = ray.cluster_resources().get("CPU", 0)
    if spec.min_actors * spec.cpus_per_actor >= cpus:
        report.info(f"warning: {spec.min_actors} actor(s) x {spec.cpus_per_actor} CPU(s) take all {cpus:g} CPUs "
                    "of the cluster and leave none to decode images: lower min_actors or cpus_per_actor unless "
                    "the cluster will grow")
    discovery = data.discover(spec.input, spec.subset)
    samples = discovery.samples
    if discovery.problems:
        report.info(f"input {spec.input}: {discovery.summary()}")
    if not spec.resume:
        storage.delete(storage.join(out, PARTS_DIR))
    kept, todo = (_plan(out, samples, found.name, found.version, threshold, spec.postprocess) if spec.resume
                  else (MANIFEST_SCHEMA.empty_table(), samples))
    overlay_ids = None if spec.overlays == "all" else set()  # None: every image, without shipping a million ids
    if spec.overlays == "sample":
        overlay_ids = {s.id for s in sorted(samples, key=lambda s: s.id)[: spec.overlay_sample]}
    report.info(f"predicting {len(todo)} of {len(samples)} images with {found.name}@{found.version} "
                f"({len(kept)} already done)")

    start = time.perf_counter()
    tables = _run_attempts(lambda remaining: _pipeline(spec, remaining, found, config, out, threshold, overlay_ids,
                                                       run_id), todo, found, threshold)
    seconds = time.perf_counter() - start
    manifest = _finish(out, kept, tables)
    record = {"spec": spec.model_dump(mode="json"),
              "model": {"name": found.name, "version": found.version, "uri": found.model_dir},
              "threshold": threshold, "postprocess": spec.postprocess, "manifest": storage.join(out, MANIFEST_FILE)}
    storage.write_text(storage.join(out, PREDICT_RECORD), json.dumps(record, indent=2))

    status = manifest["status"].to_pylist()
    ok, errors = status.count("ok"), status.count("error")
    if ok + errors != len(samples) or len(set(manifest["id"].to_pylist())) != len(samples):
        raise RuntimeError(f"the manifest has {len(manifest)} rows for {len(samples)} inputs: please report this bug")
    if errors:
        examples = manifest.filter(pc.equal(manifest["status"], "error")).slice(0, 3).to_pylist()
        report.info(f"{errors} inputs failed, e.g. " + "; ".join(f"{r['id']}: {r['error']}" for r in examples))
    return {
        "inputs": len(samples),
        "ok": ok,
        "error": errors,
        "resumed": len(kept),
        "inference_nodes": len({node for table in tables for node in table["node"].to_pylist() if node}),
        "images_per_s": round(len(todo) / seconds, 2) if todo else 0.0,
        "model": f"{found.name}@{found.version}",
        "threshold": threshold,
        "postprocess": spec.postprocess,
        "masks": storage.join(out, MASKS_DIR),
        "overlays": storage.join(out, OVERLAYS_DIR) if spec.overlays != "none" else "none",
        "manifest": storage.join(out, MANIFEST_FILE),
    }


def _run_attempts(pipeline: Callable[[list[data.Sample]], ray.data.Dataset], todo: list[data.Sample],
                  found: registry.Resolved, threshold: float) -> list[pa.Table]:
    """Run ``pipeline`` over ``todo``; when an actor or node is lost for good, again over what is left.

    Returns this run's manifest rows: one per sample (after the last attempt, the samples still left
    become error rows, so the manifest accounts for them and a later run retries them).
    """
    tables: list[pa.Table] = []
    remaining = todo
    for attempt in range(1, ATTEMPTS + 1):
        if not remaining:
            break
        try:
            for _ in report.progress(_collect(pipeline(remaining), tables), len(remaining), "predicted"):
                pass
            break
        except LOST as exc:
            seen = {image_id for table in tables for image_id in table["id"].to_pylist()}
            remaining = [s for s in remaining if s.id not in seen]
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if attempt < ATTEMPTS:
                report.info(f"warning: the pipeline failed ({reason}); running the {len(remaining)} images not done "
                            f"yet again (attempt {attempt + 1} of {ATTEMPTS})")
                continue
            report.info(f"the pipeline failed {ATTEMPTS} times ({reason}); {len(remaining)} images are recorded as "
                        "not processed: run again to retry them")
            tables.append(_not_done_rows(remaining, f"not processed: the pipeline failed: {reason}", found,
                                         threshold))
    return tables


def _finish(out: str, kept: pa.Table, tables: list[pa.Table]) -> pa.Table:
    """Write the kept rows + this run's rows (the newest per id) as the manifest, then drop the parts."""
    manifest = _newest_per_id(pa.concat_tables([kept, *tables])).sort_by("id")
    _write_parquet(storage.join(out, MANIFEST_FILE), manifest)
    storage.delete(storage.join(out, PARTS_DIR))
    return manifest
