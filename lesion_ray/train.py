"""``kind: train``: data-parallel U-Net training on Ray Train, elastic and fault tolerant.

The driver splits the data set, preprocesses it once on Ray Data (uint8 in the object store, which spills to disk)
and starts a ``TorchTrainer`` whose workers each run a :class:`TrainRecipe`. Ray Train keeps the N best checkpoints
by validation score, restarts the worker group from the latest one after a failure or a resize, and restores it
when the same spec runs again (``output`` is Ray Train's run folder). At the end the best checkpoint is published
to the model registry with the spec and the metrics history; every epoch is also recorded in TensorBoard and, when
mlflow is installed, MLflow (:mod:`lesion_ray.tracking`)::

    <output>/split.csv, metrics.json, metrics.csv, training.png, report.html, tensorboard/,
             mlflow.json, best_model/, checkpoint_*/ (Ray Train)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from typing import Annotated, Any, Literal

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from ray.data.expressions import col

from lesion_ray import data, figures, metrics, preprocess, registry, report, report_page, storage
from lesion_ray.augment import AugmentConfig, augment
from lesion_ray.inference import AUTOCAST_DTYPES, Precision
from lesion_ray.losses import LossConfig, compute_loss
from lesion_ray.models import ModelConfig, build_model, load_tensors
from lesion_ray.settings import Settings
from lesion_ray.spec import CheckContext, InputUri, JobSpec, OutputUri, Pair, RegistryUri, check_uris
from lesion_ray.tracking import TENSORBOARD_DIR, EpochLog, MlflowConfig, MlflowTarget

TRAIN_STATE_FILE = "train_state.pt"
_Workers = Annotated[int, Field(ge=1)]


class TrainSpec(JobSpec):
    kind: Literal["train"] = "train"
    data: InputUri = Field(description="an ISIC 2018 layout (its Training subset is used)")
    output: OutputUri = Field(description="the run folder: checkpoints, metrics, plot, split; same output = resume")
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    epochs: int = Field(10, ge=1, description="total epochs (a resumed run continues up to this)")
    batch_size: int = Field(8, ge=1, description="images per worker per step")
    lr: float = Field(1e-3, ge=0, description="Adam learning rate")
    seed: int = Field(0, ge=0, description="seed of the split, the initial weights and the augmentation")
    num_workers: _Workers | Pair[_Workers] = Field(
        2, description="training workers, or [min, max] for elastic training that grows when resources appear")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs each worker reserves")
    resources_per_worker: dict[str, float] = Field({}, description="extra Ray resources each worker reserves")
    use_gpu: bool = Field(False, description="one GPU per worker")
    precision: Precision = Field("fp32", description="bf16/fp16: mixed precision (GPU only)")
    channels_last: bool = Field(False, description="NHWC memory format (faster convolutions on GPUs with bf16/fp16)")
    threshold: float = Field(0.5, ge=0, le=1, description="probability above which a pixel is in the mask")
    val_fraction: float = Field(0.2, ge=0, le=0.9, description="share of images held out for validation")
    split_csv: InputUri | None = Field(None, description="a CSV id,split to use instead of a seeded split")
    checkpoints_to_keep: int = Field(2, ge=1, description="keep this many best checkpoints by validation score")
    max_failures: int = Field(3, ge=0, description="worker group restarts from the latest checkpoint on failure")
    elastic_resize_interval_s: float = Field(60.0, ge=0, description="elastic: how often to look for new resources")
    registry: RegistryUri | None = Field(
        None, description="model registry URI (default: the cluster config's registry, else runs/registry)")
    model_name: str = Field("lesion-unet", description="name under which the best model is published")
    tensorboard: bool = Field(
        True, description="write each epoch's scalars as TensorBoard events to <output>/tensorboard")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _rules(self) -> TrainSpec:
        if isinstance(self.num_workers, tuple) and self.num_workers[0] > self.num_workers[1]:
            raise PydanticCustomError("rule", f"[min, max] needs min <= max, got {list(self.num_workers)}",
                                      {"key": "num_workers"})
        if self.precision != "fp32" and not self.use_gpu:
            raise PydanticCustomError("rule", f"{self.precision} mixed precision needs use_gpu: true",
                                      {"key": "precision"})
        if not re.fullmatch(registry.NAME_PATTERN, self.model_name):
            raise PydanticCustomError("rule", "use only letters, digits, '.', '_' and '-'", {"key": "model_name"})
        if self.split_csv is None and self.val_fraction <= 0:
            raise PydanticCustomError("rule", "must be above 0 (or give split_csv)", {"key": "val_fraction"})
        if self.model.pretrained_encoder:  # absolute: Train's workers run in folders of their own
            self.model.pretrained_encoder = storage.normalize(self.model.pretrained_encoder)
        return self

    def check(self, ctx: CheckContext) -> None:
        super().check(ctx)
        if self.registry:  # train publishes there
            check_uris({"registry": OutputUri(self.registry)}, ctx)
        if self.model.pretrained_encoder:
            check_uris({"model": {"pretrained_encoder": InputUri(self.model.pretrained_encoder)}}, ctx)

    def produces(self) -> list[str]:
        return [*super().produces(), *([self.registry] if self.registry else []), f"model:{self.model_name}"]


SPEC = TrainSpec


# --- Driver ------------------------------------------------------------------------------------


def run(spec: TrainSpec, settings: Settings) -> dict[str, Any]:
    # The registry this run publishes into, recorded with its spec (training.json, report page).
    spec = spec.model_copy(update={"registry": spec.registry or RegistryUri(settings.registry)})
    output = storage.normalize(spec.output)
    found = data.discover(spec.data, "Training", task=spec.model.task)
    report.info(f"training data: {found.summary()}")
    split_uri = storage.join(output, "split.csv")
    if spec.split_csv or not storage.exists(split_uri):
        splits = data.split_samples(found.samples, spec.val_fraction, spec.seed, spec.split_csv)
    else:  # a resumed run keeps its split even when the seed or fraction changed since, but not new images
        splits = data.split_samples(found.samples, split_csv=split_uri, advice=(
            "the training data changed since this output's run started: train into a new output"))
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
    for split, purpose in (("train", "to learn from"), ("validation", "to score")):
        if not counts[split]:
            raise ValueError(f"none of the {len(splits[split])} {split} images is readable: nothing {purpose}; fix or "
                             "remove the files skipped above")

    mlflow = MlflowTarget.resolve(spec.mlflow)
    epoch_log = EpochLog(spec.epochs, output, spec.tensorboard, mlflow, spec.name, spec.model_dump(mode="json"))
    try:  # fit() raises when training fails for good: the MLflow run then ends as failed, not running
        result = _trainer(spec, datasets, output, epoch_log).fit()
        summary = _finish(spec, result, output, counts, len(bad))
    except Exception:
        if mlflow and (failed_run := mlflow.recorded_run(output)):
            mlflow.finish(failed_run, [], {}, failed=True)
        raise
    run_id = mlflow.recorded_run(output) if mlflow else None
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
    ds = ds.select_columns(["id", "error", "image", "mask", "present"]).materialize()
    errors = ds.filter(expr=col("error") != "").select_columns(["id", "error"]).take_all()
    columns = ["image", "mask", "present"]
    # Materialized per split too, so an epoch only reads blocks instead of re-running the filter.
    datasets = {name: ds.filter(expr=(col("error") == "") & col("id").is_in([s.id for s in items]))
                .select_columns(columns).materialize() for name, items in splits.items()}
    return datasets, errors


def _trainer(spec: TrainSpec, datasets: dict[str, ray.data.Dataset], output: str,
             epoch_log: EpochLog) -> ray.train.torch.TorchTrainer:
    fs, path = storage.pyarrow_filesystem(storage.parent(output))
    resources = {"CPU": spec.cpus_per_worker, **spec.resources_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    scaling = ray.train.ScalingConfig(
        num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources,
        elastic_resize_monitor_interval_s=spec.elastic_resize_interval_s)
    checkpoints = ray.train.CheckpointConfig(
        num_to_keep=spec.checkpoints_to_keep, checkpoint_score_attribute="val_score", checkpoint_score_order="max")
    run_config = ray.train.RunConfig(
        name=storage.basename(output), storage_path=path, storage_filesystem=fs, checkpoint_config=checkpoints,
        failure_config=ray.train.FailureConfig(max_failures=spec.max_failures), callbacks=[epoch_log])
    # Ordered ingest: the streaming split then hands each worker the same blocks in the same order every run (it
    # ignores locality hints), so a run's history is reproducible.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return ray.train.torch.TorchTrainer(
        train_loop, train_loop_config={"spec": spec}, scaling_config=scaling, run_config=run_config, datasets=datasets,
        # Validation is not split: every worker reads it all and scores every world_size-th batch,
        # so no image is dropped to make equal shards.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


def _finish(spec: TrainSpec, result: ray.train.Result, output: str, counts: dict[str, int],
            unreadable: int) -> dict[str, Any]:
    with result.checkpoint.as_directory() as latest:
        history = read_train_state(latest)["history"]
    best_dir = storage.join(output, registry.BEST_MODEL_DIR)
    ref, best = TrainRecipe(spec).publish(result, history, best_dir)
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(history, indent=2))
    storage.write_text(storage.join(output, "metrics.csv"), figures.history_csv(history))
    curves = figures.plot_history(history, spec.model.task)
    storage.write_bytes(storage.join(output, "training.png"), curves)
    report.info(f"best epoch {best['epoch']}: val_score {best['val_score']:.4f}; published {ref}")
    page_uri = storage.join(output, report_page.PAGE_FILE)
    _write_page(page_uri, spec, history, curves, _published_card(ref, spec.registry, best_dir), counts, unreadable)
    return {"model": ref, "best_val_score": best["val_score"], "best_epoch": best["epoch"], "epochs": len(history),
            "train_images": counts["train"], "validation_images": counts["validation"], "unreadable_images": unreadable,
            "output": output, "registry": spec.registry, "report": page_uri,
            **({"tensorboard": storage.join(output, TENSORBOARD_DIR)} if spec.tensorboard else {})}


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
    data_rows = [("data", spec.data), ("training images", counts["train"]),
                 ("validation images", counts["validation"]), ("unreadable images", unreadable)]
    sections = [report_page.curves_section(history, spec.model.task, curves),
                report_page.section("Data", report_page.key_values(data_rows), "data"),
                report_page.model_section(card),
                report_page.specs_section([("train spec", spec.model_dump(mode="json"))])]
    subtitle = f"published {card['config']['name']}@{card['config']['version']}, {len(history)} epochs"
    storage.write_text(uri, report_page.page(f"Training '{spec.name}'", subtitle, sections))


# --- Recipe ------------------------------------------------------------------------------------


class TrainRecipe:
    """The training workflow, torchtune's style: each Ray Train worker runs :meth:`setup`, then :meth:`train`;
    after the fit, the driver calls :meth:`publish` once."""

    def __init__(self, spec: TrainSpec) -> None:
        self.spec = spec
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")  # one process until setup says otherwise
        self.amp = AUTOCAST_DTYPES.get(spec.precision)  # None: fp32, no autocast
        self.state: dict[str, Any] = {"epoch": 0, "history": [], "starts": 0}

    def setup(self) -> None:
        """This worker's place, model, optimizer and data shards; resumes from Ray Train's latest checkpoint."""
        spec, checkpoint = self.spec, ray.train.get_checkpoint()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(spec.seed)
        # A resumed worker takes every weight from the checkpoint: reading the pretrained encoder would be wasted.
        model = build_model(spec.model.model_copy(update={"pretrained_encoder": None}) if checkpoint else spec.model)
        if spec.loss.name == "bce":
            model.head1.requires_grad_(False)  # only the seed loss trains head 1; DDP must not wait for its grads
        self.optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=spec.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=0.8, patience=5)
        if checkpoint:
            with checkpoint.as_directory() as folder:
                model.load_state_dict(registry.read_state_dict(os.path.join(folder, registry.MODEL_FILE)))
                self.state = read_train_state(folder)
            self.optimizer.load_state_dict(self.state.pop("optimizer"))
            self.scheduler.load_state_dict(self.state.pop("scheduler"))
            self.state["starts"] += 1
            if self.rank == 0:
                report.info(f"resumed after epoch {self.state['epoch']} with {self.world} workers")
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=spec.precision == "fp16")
        self.train_data = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("validation")

    def train(self) -> None:
        for epoch in range(self.state["epoch"] + 1, self.spec.epochs + 1):
            start = time.perf_counter()
            loss_sum, seen = self.train_epoch(epoch)
            train_time = time.perf_counter() - start
            train_loss, train_images = _all_sum(np.array([loss_sum.item(), seen]), self.device).tolist()
            scores = self.validate(self.model, self.val_data)
            self.scheduler.step(scores["val_loss"])
            self.save_checkpoint({
                "epoch": epoch, "train_loss": train_loss / max(train_images, 1), **scores,
                "lr": self.optimizer.param_groups[0]["lr"], "world_size": self.world, "starts": self.state["starts"],
                "train_images_per_s": train_images / train_time, "epoch_time_s": time.perf_counter() - start})

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, int]:
        """One pass over this worker's shard, augmented and shuffled (seeded per epoch and rank): loss sum, images."""
        spec, device = self.spec, self.device
        epoch_seed = spec.seed * 100_003 + epoch * 1_009 + self.rank
        generator = torch.Generator(device=device).manual_seed(epoch_seed)
        self.model.train()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in self.train_data.iter_torch_batches(batch_size=spec.batch_size, device=device,
                                                        local_shuffle_buffer_size=4 * spec.batch_size,
                                                        local_shuffle_seed=epoch_seed):
            image, mask = augment(batch["image"].float() / 255, batch["mask"].float(), spec.augment, generator)
            loss = compute_loss(self._forward(self.model, image), mask, batch["present"], spec.loss)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach() * len(image)  # no .item(): it would wait for the GPU every step
            seen += len(image)
        return loss_sum, seen

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, dataset: ray.data.Dataset | ray.data.DataIterator) -> dict[str, float]:
        """Validation loss and the task's official score (:mod:`lesion_ray.metrics`) at the model's input size. Each
        worker reads all of ``dataset``, counts every ``world``-th batch (zeros for others); an all-reduce adds them."""
        spec, classes = self.spec, self.spec.model.num_classes
        # The bare module: DDP's forward syncs buffers across workers, and workers score different batch counts.
        model = getattr(model, "module", model).eval()
        losses, batches = np.zeros(2), []  # [loss sum, images]; pixel counts [images, classes, 4] per batch
        for i, batch in enumerate(dataset.iter_torch_batches(batch_size=spec.batch_size, device=self.device)):
            if i % self.world != self.rank:
                batches.append(np.zeros((len(batch["mask"]), classes, 4)))
                continue
            image, mask = batch["image"].float() / 255, batch["mask"].float()
            outputs = self._forward(model, image)
            losses += [compute_loss(outputs, mask, batch["present"], spec.loss).item() * len(image), len(image)]
            pred = torch.sigmoid(outputs[0].float()) > spec.threshold
            batches.append(metrics.mask_counts((mask > 0.5).cpu().numpy(), pred.cpu().numpy()))
        totals = _all_sum(np.concatenate([losses, *(b.ravel() for b in batches)]), self.device)
        counts = totals[2:].reshape(-1, classes, 4)
        if not np.all(counts.sum(-1) == spec.model.input_size ** 2):  # else a Task 1 image would score 1.0 silently
            raise RuntimeError("validation batches differ between workers: each image must be scored exactly once")
        # Plain floats: the history goes into checkpoints, which load weights_only (no numpy scalars).
        out = {"val_loss": float(totals[0] / totals[1])}
        if spec.model.task == 1:
            official = metrics.task1_scores(counts[:, 0])
            return out | {"val_score": official["threshold_jaccard"], "val_jaccard": official["jaccard"],
                          "val_dice": official["dice"]}
        official = metrics.task2_scores(counts.reshape(-1, 4), counts.sum(-1).ravel(), data.ATTRIBUTES * len(counts))
        return out | {"val_score": official["jaccard"], "val_dice": official["dice"],
                      **{f"jaccard_{name}": official["per_attribute"][name]["jaccard"] for name in data.ATTRIBUTES}}

    def save_checkpoint(self, row: dict[str, Any]) -> None:
        """Report the epoch to Ray Train (EpochLog records it); rank 0 attaches the checkpoint (same weights on all)."""
        self.state["history"].append(row)
        self.state["epoch"] = row["epoch"]
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                config = registry.config_to_json(self.spec.model, self.spec.threshold)
                registry.save_model_dir(folder, registry.plain_state_dict(self.model), config)
                torch.save({**self.state, "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict()}, os.path.join(folder, TRAIN_STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(row, checkpoint=checkpoint)

    def publish(self, result: ray.train.Result, history: list[dict[str, Any]],
                best_dir: str) -> tuple[str, dict[str, Any]]:
        """Publish the best checkpoint (also copied to ``best_dir``) with the spec and ``history``, unless this run
        already published it (re-running a finished spec must not add a duplicate version): its reference, metrics."""
        # On a tie the earlier epoch stays the best: a later one publishes only if it beat it.
        checkpoint, best = max(result.best_checkpoints, key=lambda item: (item[1]["val_score"], -item[1]["epoch"]))
        marker = storage.join(best_dir, registry.METRICS_FILE)
        checkpoint_name = os.path.basename(checkpoint.path.rstrip("/"))
        previous = json.loads(storage.read_text(marker)) if storage.exists(marker) else {}
        if previous.get("checkpoint") == checkpoint_name and previous.get("model"):
            return previous["model"], best
        model_metrics = {k: v for k, v in best.items() if isinstance(v, (int, float))}
        training = {"spec": self.spec.model_dump(mode="json"), "history": history}
        with checkpoint.as_directory() as local:
            # A checkpoint is already a model folder (plain state_dict + config.json): copy its bytes, publish it.
            for name in (registry.MODEL_FILE, registry.CONFIG_FILE):
                storage.write_bytes(storage.join(best_dir, name), storage.read_bytes(os.path.join(local, name)))
            storage.write_text(storage.join(best_dir, registry.TRAINING_FILE), json.dumps(training, indent=2))
            ref = registry.publish(local, self.spec.model_name, model_metrics, self.spec.registry, training)
        storage.write_text(marker, json.dumps({**model_metrics, "checkpoint": checkpoint_name, "model": ref}, indent=2))
        return ref, best

    def _forward(self, model: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.spec.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return model(image)


def train_loop(config: dict[str, Any]) -> None:
    recipe = TrainRecipe(config["spec"])
    recipe.setup()
    recipe.train()


def read_train_state(folder: str) -> dict[str, Any]:
    """A checkpoint's train state (epoch, history, optimizer and scheduler state), ``weights_only``: a checkpoint
    in shared storage that someone tampered with must not run code in every training worker."""
    return load_tensors(os.path.join(folder, TRAIN_STATE_FILE), "Resume from a checkpoint lesion-ray wrote, or "
                        "start a new run in another output folder.")


def _all_sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    """``values`` (float64) summed over all workers."""
    if dist.is_available() and dist.is_initialized():
        tensor = torch.from_numpy(values).to(device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()
    return values
