"""``kind: train``: data-parallel U-Net training on Ray Train, elastic and fault tolerant.

The driver discovers and splits the data set, preprocesses it once on Ray Data (kept as
uint8 in the object store, which spills to disk when it is large) and starts a
``TorchTrainer``. Each worker reads its shard, augments on the fly (the same geometry for an
image and its masks), trains with Adam + ReduceLROnPlateau as the seed, scores the
validation set (each worker a share, summed across workers) and reports a checkpoint per
epoch. Ray Train keeps the N best checkpoints by validation score, restarts the worker group
from the latest one after a failure or a resize, and restores it when the same spec runs
again (the run's ``output`` is Ray Train's run folder). At the end the best checkpoint is
published to the model registry (with the spec and the metrics history) and the history, its
plot, a report page and the split are written next to the run. Every epoch is also recorded in
TensorBoard and, when mlflow is installed, MLflow (:mod:`lesion_ray.tracking`)::

    <output>/split.csv, metrics.json, metrics.csv, training.png, report.html, tensorboard/,
             mlflow.json, best_model/, checkpoint_*/ (Ray Train)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.expressions import col

from lesion_ray import data, figures, metrics, preprocess, registry, report, report_page, storage
from lesion_ray.model import AugmentConfig, LossConfig, ModelConfig, augment, build_model, compute_loss
from lesion_ray.settings import Settings
from lesion_ray.spec import (
    CheckContext,
    InputUri,
    JobSpec,
    OutputUri,
    RegistryUri,
    SpecError,
    check_uris,
    key_path,
    param,
    to_dict,
)
from lesion_ray.tracking import TENSORBOARD_DIR, EpochLog, MlflowConfig, MlflowTarget

TRAIN_STATE_FILE = "train_state.pt"


@dataclass(kw_only=True)
class TrainSpec(JobSpec):
    data: InputUri = param(help="an ISIC 2018 layout (its Training subset is used)")
    output: OutputUri = param(help="the run folder: checkpoints, metrics, plot, split; same output = resume")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = param(10, min=1, help="total epochs (a resumed run continues up to this)")
    batch_size: int = param(8, min=1, help="images per worker per step")
    lr: float = param(1e-3, min=0, help="Adam learning rate")
    seed: int = param(0, help="seed of the split, the initial weights and the augmentation")
    num_workers: int | tuple[int, int] = param(
        2, min=1, help="training workers, or [min, max] for elastic training that grows when resources appear")
    cpus_per_worker: float = param(1.0, min=0, help="CPUs each worker reserves")
    resources_per_worker: dict[str, float] = param({}, help="extra Ray resources each worker reserves")
    use_gpu: bool = param(False, help="one GPU per worker")
    precision: Literal["fp32", "bf16", "fp16"] = param("fp32", help="bf16/fp16: mixed precision (GPU only)")
    threshold: float = param(0.5, min=0, max=1, help="probability above which a pixel is in the mask")
    val_fraction: float = param(0.2, min=0, max=0.9, help="share of images held out for validation")
    split_csv: InputUri | None = param(None, help="a CSV id,split to use instead of a seeded split")
    checkpoints_to_keep: int = param(2, min=1, help="keep this many best checkpoints by validation score")
    max_failures: int = param(3, min=0, help="worker group restarts from the latest checkpoint on failure")
    elastic_resize_interval_s: float = param(60.0, min=0, help="elastic: how often to look for new resources")
    registry: RegistryUri | None = param(None, help="model registry URI (default: the cluster config's registry, "
                                                     "else runs/registry)")
    model_name: str = param("lesion-unet", help="name under which the best model is published")
    tensorboard: bool = param(True, help="write each epoch's scalars as TensorBoard events to <output>/tensorboard")
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self, source: str, path: str) -> None:
        self.model.validate(source, key_path(path, "model"))
        if isinstance(self.num_workers, tuple) and self.num_workers[0] > self.num_workers[1]:
            raise SpecError(source, key_path(path, "num_workers"),
                            f"[min, max] needs min <= max, got {list(self.num_workers)}")
        if self.precision != "fp32" and not self.use_gpu:
            raise SpecError(source, key_path(path, "precision"),
                            f"{self.precision} mixed precision needs use_gpu: true")
        if not re.fullmatch(registry.NAME_PATTERN, self.model_name):
            raise SpecError(source, key_path(path, "model_name"),
                            "use only letters, digits, '.', '_' and '-'")
        if self.split_csv is None and self.val_fraction <= 0:
            raise SpecError(source, key_path(path, "val_fraction"),
                            "must be above 0 (or give split_csv)")

    def check(self, ctx: CheckContext) -> None:
        super().check(ctx)
        if self.registry:  # train publishes there
            check_uris({"registry": OutputUri(self.registry)}, ctx)

    def produces(self) -> list[str]:
        return [*super().produces(), *([self.registry] if self.registry else []), f"model:{self.model_name}"]


SPEC = TrainSpec


# --- Driver ------------------------------------------------------------------------------------


def run(spec: TrainSpec, settings: Settings) -> dict[str, Any]:
    # The registry this run publishes into, recorded with its spec (training.json, report page).
    spec = dataclasses.replace(spec, registry=spec.registry or RegistryUri(settings.registry))
    output = storage.normalize(spec.output)
    task = spec.model.task
    found = data.discover(spec.data, "Training", task=task)
    report.info(f"training data: {found.summary()}")
    split_uri = storage.join(output, "split.csv")
    # A resumed run keeps its split even when the seed or fraction changed since.
    split_source = spec.split_csv or (split_uri if storage.exists(split_uri) else None)
    splits = data.split_samples(found.samples, spec.val_fraction, spec.seed, split_source)
    if not splits["train"] or not splits["validation"]:
        raise ValueError(f"the split has {len(splits['train'])} training and {len(splits['validation'])} validation "
                         "images; both need at least one: add images or change val_fraction")
    data.write_split(splits, split_uri)

    datasets, bad = prepare(splits, spec)
    for row in bad[:5]:
        report.info(f"skipped {row['id']}: {row['error']}")
    bad_ids = {row["id"] for row in bad}
    counts = {name: sum(s.id not in bad_ids for s in samples) for name, samples in splits.items()}
    report.info(f"{counts['train']} training and {counts['validation']} validation images, {len(bad)} unreadable")

    mlflow = MlflowTarget.resolve(spec.mlflow)
    epoch_log = EpochLog(spec.epochs, output, spec.tensorboard, mlflow, spec.name, to_dict(spec))
    result = _trainer(spec, datasets, output, epoch_log).fit()
    run_id = mlflow.recorded_run(output) if mlflow else None
    if result.error:
        if run_id:
            mlflow.finish(run_id, [], {}, failed=True)
        raise RuntimeError(f"training failed: {result.error}")
    try:
        summary = _finish(spec, result, output, counts, len(bad))
    except Exception:
        if run_id:
            mlflow.finish(run_id, [], {}, failed=True)
        raise
    if run_id:
        artifacts = [storage.join(output, name)
                     for name in (report_page.PAGE_FILE, "training.png", "metrics.csv", "split.csv")]
        mlflow.finish(run_id, artifacts, {"lesion_ray.model": summary["model"]})
        summary["mlflow_run"] = run_id
    return summary


def prepare(splits: dict[str, list[data.Sample]], spec: TrainSpec) -> tuple[dict[str, ray.data.Dataset], list[dict]]:
    """Decode and resize every image once, keep uint8 rows in the object store for all epochs;
    returns one dataset per split (usable rows only) and the rows that failed (id, error)."""
    samples = [s for items in splits.values() for s in items]
    ds = preprocess.image_dataset(samples, size=spec.model.input_size, task=spec.model.task)
    # Blocks in input order, not in the order tasks finish: the same blocks, in the same order, every run
    # (derived datasets copy this context).
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_compact, batch_format="numpy").materialize()
    errors = ds.filter(expr=col("error") != "").select_columns(["id", "error"]).take_all()
    columns = ["image", "mask", "present"]
    # Materialized per split too, so an epoch only reads blocks instead of re-running the filter.
    datasets = {name: ds.filter(expr=(col("error") == "") & col("id").is_in([s.id for s in items]))
                .select_columns(columns).materialize() for name, items in splits.items()}
    return datasets, errors


def _compact(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "id": batch["id"],
        "error": batch["error"],
        "image": np.round(batch["image"] * 255).astype(np.uint8),
        "mask": (batch["mask"] > 0.5).astype(np.uint8),
        "present": batch["present"].astype(np.float32),
    }


def _trainer(spec: TrainSpec, datasets: dict[str, ray.data.Dataset], output: str,
             epoch_log: EpochLog) -> ray.train.torch.TorchTrainer:
    fs, path = storage.pyarrow_filesystem(storage.parent(output))
    scaling = ray.train.ScalingConfig(
        num_workers=spec.num_workers,
        use_gpu=spec.use_gpu,
        resources_per_worker={"CPU": spec.cpus_per_worker, **spec.resources_per_worker,
                              **({"GPU": 1} if spec.use_gpu else {})},
        elastic_resize_monitor_interval_s=spec.elastic_resize_interval_s,
    )
    run_config = ray.train.RunConfig(
        name=storage.basename(output),
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=spec.checkpoints_to_keep,
            checkpoint_score_attribute="val_score",
            checkpoint_score_order="max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
        callbacks=[epoch_log],
    )
    # Ordered ingest: the streaming split then hands each worker the same blocks in the same order
    # every run (it ignores locality hints), so a run's history is reproducible.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        # Validation is not split: every worker reads it all and scores every world_size-th batch,
        # so no image is dropped to make equal shards.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


def _finish(spec: TrainSpec, result: ray.train.Result, output: str, counts: dict[str, int],
            unreadable: int) -> dict[str, Any]:
    with result.checkpoint.as_directory() as latest:
        history = read_train_state(latest)["history"]
    best_checkpoint, best = max(result.best_checkpoints, key=lambda item: item[1]["val_score"])
    best_dir = storage.join(output, registry.BEST_MODEL_DIR)
    ref = _publish_once(spec, best_checkpoint, best, best_dir, {"spec": to_dict(spec), "history": history})

    storage.write_text(storage.join(output, "metrics.json"), json.dumps(history, indent=2))
    storage.write_text(storage.join(output, "metrics.csv"), _history_csv(history))
    curves = figures.plot_history(history, spec.model.task)
    storage.write_bytes(storage.join(output, "training.png"), curves)
    report.info(f"best epoch {best['epoch']}: val_score {best['val_score']:.4f}; published {ref}")
    page_uri = storage.join(output, report_page.PAGE_FILE)
    _write_page(page_uri, spec, history, curves, _published_card(ref, spec.registry, best_dir), counts, unreadable)
    return {
        "model": ref,
        "best_val_score": best["val_score"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "train_images": counts["train"],
        "validation_images": counts["validation"],
        "unreadable_images": unreadable,
        "output": output,
        "registry": spec.registry,
        "report": page_uri,
        **({"tensorboard": storage.join(output, TENSORBOARD_DIR)} if spec.tensorboard else {}),
    }


def _published_card(ref: str, registry_uri: str | None, best_dir: str) -> dict[str, Any]:
    """The registry version's model card; the run's best model folder's when that version cannot be read
    (a finished spec run again after its registry moved)."""
    try:
        return registry.model_card(registry.resolve(ref, registry_uri).model_dir)
    except storage.StorageError:
        card = registry.model_card(best_dir)
        name, _, version = ref.rpartition("@")
        card["config"].update(name=name, version=version)
        return card


def _write_page(uri: str, spec: TrainSpec, history: list[dict[str, Any]], curves: bytes, card: dict[str, Any],
                counts: dict[str, int], unreadable: int) -> None:
    """report.html: what was trained on, the curves and every epoch, the published model, the spec."""
    data_rows = [("data", spec.data), ("training images", counts["train"]),
                 ("validation images", counts["validation"]), ("unreadable images", unreadable)]
    sections = [report_page.curves_section(history, spec.model.task, curves),
                report_page.section("Data", report_page.key_values(data_rows), "data"),
                report_page.model_section(card),
                report_page.specs_section([("train spec", to_dict(spec))])]
    subtitle = f"published {card['config']['name']}@{card['config']['version']}, {len(history)} epochs"
    storage.write_text(uri, report_page.page(f"Training '{spec.name}'", subtitle, sections))


def _publish_once(spec: TrainSpec, checkpoint: ray.train.Checkpoint, best: dict[str, Any], best_dir: str,
                  training: dict[str, Any]) -> str:
    """Publish the best checkpoint with ``training`` (spec and history), unless this run already published
    that same checkpoint (re-running a finished spec must not add a duplicate version)."""
    marker = storage.join(best_dir, registry.METRICS_FILE)
    checkpoint_name = os.path.basename(checkpoint.path.rstrip("/"))
    if storage.exists(marker):
        previous = json.loads(storage.read_text(marker))
        if previous.get("checkpoint") == checkpoint_name and previous.get("model"):
            return previous["model"]
    model_metrics = {k: v for k, v in best.items() if isinstance(v, (int, float))}
    with checkpoint.as_directory() as local:
        # A checkpoint is already a model folder (plain state_dict + config.json): copy its bytes, publish it as is.
        for name in (registry.MODEL_FILE, registry.CONFIG_FILE):
            storage.write_bytes(storage.join(best_dir, name), storage.read_bytes(os.path.join(local, name)))
        storage.write_text(storage.join(best_dir, registry.TRAINING_FILE), json.dumps(training, indent=2))
        ref = registry.publish(local, spec.model_name, model_metrics, spec.registry, training)
    storage.write_text(marker, json.dumps({**model_metrics, "checkpoint": checkpoint_name, "model": ref}, indent=2))
    return ref


def _history_csv(history: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


# --- Workers -----------------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: resume, then train/validate/checkpoint each remaining epoch."""
    spec: TrainSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)
    checkpoint = ray.train.get_checkpoint()
    # A resumed worker takes every weight from the checkpoint: reading the pretrained encoder would be wasted.
    model = build_model(dataclasses.replace(spec.model, pretrained_encoder=None) if checkpoint else spec.model)
    if spec.loss.name == "bce":
        model.head1.requires_grad_(False)  # only the seed loss trains head 1; DDP must not wait for its grads
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.8, patience=5)
    state: dict[str, Any] = {"epoch": 0, "history": [], "starts": 0}
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(registry.read_state_dict(os.path.join(folder, registry.MODEL_FILE)))
            state = read_train_state(folder)
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        state["starts"] += 1
        if rank == 0:
            report.info(f"resumed after epoch {state['epoch']} with {world} workers")
    model = ray.train.torch.prepare_model(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("validation")

    for epoch in range(state["epoch"] + 1, spec.epochs + 1):
        start = time.perf_counter()
        epoch_seed = spec.seed * 100_003 + epoch * 1_009 + rank
        generator = torch.Generator(device=device).manual_seed(epoch_seed)
        model.train()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in train_shard.iter_torch_batches(batch_size=spec.batch_size, device=device,
                                                    local_shuffle_buffer_size=4 * spec.batch_size,
                                                    local_shuffle_seed=epoch_seed):
            image, mask = augment(batch["image"].float() / 255, batch["mask"].float(), spec.augment, generator)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(image)
            loss = compute_loss(outputs, mask, batch["present"], spec.loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(image)  # no .item(): it would wait for the GPU every step
            seen += len(image)
        train_time = time.perf_counter() - start
        sums = torch.stack([loss_sum.cpu(), torch.tensor(seen, dtype=torch.float64)])
        train_loss, train_images = _all_sum(sums, device).tolist()
        scores = validate(model, val_data, spec, device, amp_dtype, rank, world)
        scheduler.step(scores["val_loss"])
        row = {"epoch": epoch, "train_loss": train_loss / max(train_images, 1), **scores,
               "lr": optimizer.param_groups[0]["lr"], "world_size": world, "starts": state["starts"],
               "train_images_per_s": train_images / train_time, "epoch_time_s": time.perf_counter() - start}
        state["history"].append(row)
        state["epoch"] = epoch
        _report(row, model, optimizer, scheduler, state, spec, rank)  # EpochLog records it


def _report(row: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, state: dict[str, Any], spec: TrainSpec, rank: int) -> None:
    """Report the epoch; rank 0 attaches the checkpoint (all workers hold the same weights)."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            config = registry.config_to_json(spec.model, spec.threshold)
            registry.save_model_dir(folder, registry.plain_state_dict(model), config)
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       os.path.join(folder, TRAIN_STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(row, checkpoint=checkpoint)


def read_train_state(folder: str) -> dict[str, Any]:
    """A checkpoint's train state (epoch, history, optimizer and scheduler state).

    Only tensors, numbers, strings, lists and dicts are unpickled (``weights_only``): a checkpoint in
    shared storage that someone tampered with must not run code in every training worker.
    """
    path = os.path.join(folder, TRAIN_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises turning weights_only off, the very thing to avoid: keep only what it found.
        found = [line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = found[0].strip().rstrip(".") if found else type(exc).__name__
        raise ValueError(f"refused to load {TRAIN_STATE_FILE} of the checkpoint {folder}: it holds objects other "
                         f"than tensors, numbers, strings, lists and dicts, and loading them could run code "
                         f"({reason}). Resume from a checkpoint lesion-ray wrote, or start a new run in another "
                         "output folder.") from None


def _all_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.to(device)
        dist.all_reduce(values)
    return values.cpu()


@torch.no_grad()
def validate(model: torch.nn.Module, val_data: Any, spec: TrainSpec, device: torch.device,
             amp_dtype: torch.dtype | None, rank: int, world: int) -> dict[str, float]:
    """Validation loss and the task's official score at the model's input size.

    Task 1: mean thresholded Jaccard (any per-image Jaccard < 0.65 counts 0). Task 2: Jaccard of
    TP/FP/FN pooled over images and attributes, each divided by the image's pixel count; plus
    per-attribute Jaccard. Each worker scores every ``world``-th batch; the sums are all-reduced.
    """
    # The bare module: DDP's forward syncs buffers across workers, and workers score different batch counts.
    model = getattr(model, "module", model).eval()
    classes = spec.model.num_classes
    # [loss sum, images, thresholded Jaccard sum, Jaccard sum, Dice sum] + pooled counts [C, 4]
    totals = torch.zeros(5 + classes * 4, dtype=torch.float64)
    batches = val_data.iter_torch_batches(batch_size=spec.batch_size, device=device)
    for i, batch in enumerate(batches):
        if i % world != rank:
            continue
        image, mask = batch["image"].float() / 255, batch["mask"].float()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(image)
        loss = compute_loss(outputs, mask, batch["present"], spec.loss)
        pred = torch.sigmoid(outputs[0].float()) > spec.threshold
        truth = mask > 0.5
        counts = torch.stack([(pred & truth).sum((2, 3)), (pred & ~truth).sum((2, 3)),
                              (~pred & truth).sum((2, 3)), (~pred & ~truth).sum((2, 3))], dim=-1)
        counts = counts.cpu().numpy()  # [B, C, 4]
        totals[0] += loss.item() * len(image)
        totals[1] += len(image)
        if spec.model.task == 1:
            per_image = counts[:, 0]
            totals[2] += metrics.threshold_jaccard(per_image).sum()
            totals[3] += metrics.jaccard(per_image).sum()
            totals[4] += metrics.dice(per_image).sum()
        else:
            totals[5:] += torch.from_numpy(counts / truth[0, 0].numel()).sum(0).flatten()
    totals = _all_sum(totals, device).numpy()
    n = max(totals[1], 1)
    # Plain floats: the history goes into checkpoints, which load weights_only (no numpy scalars).
    out = {"val_loss": float(totals[0] / n)}
    if spec.model.task == 1:
        out.update(val_score=float(totals[2] / n), val_jaccard=float(totals[3] / n), val_dice=float(totals[4] / n))
        return out
    pooled = totals[5:].reshape(classes, 4)
    out.update(val_score=float(metrics.jaccard(pooled.sum(0))), val_dice=float(metrics.dice(pooled.sum(0))))
    out.update({f"jaccard_{name}": float(metrics.jaccard(pooled[c])) for c, name in enumerate(data.ATTRIBUTES)})
    return out
