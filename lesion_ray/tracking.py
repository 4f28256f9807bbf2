"""Where a training's epochs are recorded as they happen: the console, TensorBoard and MLflow.

:class:`EpochLog` is a Ray Train callback. It runs in the Train controller, on the driver's node, so every epoch
is recorded once (not once per worker) and survives the loss of a worker's node. TensorBoard events are written
locally and copied to ``<output>/tensorboard/`` (any storage) after each epoch. The controller opens the MLflow
run at the first epoch (MLflow's start-up costs seconds, off the driver's path) and records its id in
``<output>/mlflow.json``, so a resumed training continues it; the driver closes it with the report as artifacts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
from pydantic import BaseModel, ConfigDict, Field

from lesion_ray import report, storage

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RECORD = "mlflow.json"  # {"tracking_uri", "run_id"}: lets a resumed run continue its MLflow run
_TAGS = {"train_loss": "loss/train", "val_loss": "loss/validation", "val_score": "score/validation"}


class MlflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = Field(True, description="log params, epochs and the report to MLflow (when mlflow is installed)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                       "sqlite:///runs/mlflow.db under the working directory)")
    experiment: str = Field("lesion-ray", description="MLflow experiment name")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """An epoch row's numbers by TensorBoard/MLflow name."""
    return {_TAGS.get(key, key): float(value) for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow params: ``model.input_size`` -> ``"64"``."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's limit for one param value
    return out


@dataclass(frozen=True)
class MlflowTarget:
    """Where a training logs to MLflow, resolved on the driver (its working directory and environment);
    picklable, so the Train controller gets a copy and opens the run there, off the driver's path."""

    tracking_uri: str
    experiment: str
    artifact_location: str | None  # for a new experiment in a local database

    @classmethod
    def resolve(cls, config: MlflowConfig) -> MlflowTarget | None:
        """None when MLflow is switched off or not installed."""
        if not config.enabled or importlib.util.find_spec("mlflow") is None:
            return None
        uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///runs/mlflow.db"
        if not uri.startswith("sqlite:///"):  # a server decides where artifacts go
            return cls(uri, config.experiment, None)
        # A local database, by an absolute path (the Train controller runs in another folder), keeps a new
        # experiment's artifacts beside it: MLflow's default is ./mlruns under whatever folder the process is in.
        database = os.path.abspath(uri.removeprefix("sqlite:///"))
        return cls(f"sqlite:///{database}", config.experiment, f"file://{os.path.dirname(database)}/mlruns")

    @functools.cached_property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        # MLflow gives its logger a console handler when imported; its INFO lines (database set-up) are noise.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        if self.tracking_uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.tracking_uri.removeprefix("sqlite:///")), exist_ok=True)
        return MlflowClient(self.tracking_uri)

    def open_run(self, output: str, run_name: str, params: dict[str, Any]) -> str:
        """The run ``<output>/mlflow.json`` names (a resumed training), else a new one with ``params`` logged."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        client = self.client
        if (run_id := self.recorded_run(output)) is not None:
            with contextlib.suppress(MlflowException):  # deleted meanwhile: start another
                client.update_run(run_id, status="RUNNING")
                return run_id
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment
                         else client.create_experiment(self.experiment, artifact_location=self.artifact_location))
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"lesion_ray.output": output}).info.run_id
        items = [Param(k, v) for k, v in flat_params(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            client.log_batch(run_id, params=items[i:i + 100])
        record = {"tracking_uri": self.tracking_uri, "run_id": run_id}
        storage.write_text(storage.join(output, MLFLOW_RECORD), json.dumps(record, indent=2))
        return run_id

    def recorded_run(self, output: str) -> str | None:
        """The run id ``<output>/mlflow.json`` records for this tracking URI, if any."""
        record_uri = storage.join(output, MLFLOW_RECORD)
        try:
            record = json.loads(storage.read_text(record_uri)) if storage.exists(record_uri) else {}
        except (ValueError, storage.StorageError):  # damaged: a new run is opened
            return None
        return record.get("run_id") if record.get("tracking_uri") == self.tracking_uri else None

    def log_epoch(self, run_id: str, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(row["epoch"])) for key, value in scalars(row).items()]
        self.client.log_batch(run_id, metrics=metrics)

    def finish(self, run_id: str, files: list[str], tags: dict[str, str], failed: bool = False) -> None:
        """Attach ``files`` (storage URIs, each under its own name), set ``tags``, mark the run finished or failed.
        A tracking server that fails here costs a warning, not the training that just finished."""
        try:
            client = self.client
            with tempfile.TemporaryDirectory() as folder:
                for uri in files:
                    if storage.exists(uri):
                        client.log_artifact(run_id, storage.local_copy(uri, folder))
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        except Exception as exc:
            report.info(f"warning: closing MLflow run {run_id} failed ({type(exc).__name__}: {exc})")


class EpochLog(ray.train.UserCallback):
    """One console line, one TensorBoard step and one MLflow step per epoch."""

    def __init__(self, epochs: int, output: str, tensorboard: bool, mlflow: MlflowTarget | None, run_name: str,
                 params: dict[str, Any]) -> None:
        self.epochs, self.output, self.mlflow, self.run_name, self.params = epochs, output, mlflow, run_name, params
        self.tensorboard_uri = storage.join(output, TENSORBOARD_DIR) if tensorboard else None
        self._writer: Any = None  # made in the controller: an open event file does not travel
        self._events_dir = ""
        self._run_id: str | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = metrics[0]  # every worker reports the same all-reduced row
        report.info(f"epoch {row['epoch']}/{self.epochs}: train_loss {row['train_loss']:.4f} "
                    f"val_loss {row['val_loss']:.4f} val_score {row['val_score']:.4f} "
                    f"({row['train_images_per_s']:.1f} images/s on {row['world_size']} workers)")
        # A record that fails must not fail the training: say so, stop that record and go on (an unreachable
        # tracking server would otherwise hold up every epoch with its retries).
        if self.tensorboard_uri:
            try:
                self._log_tensorboard(row)
            except Exception as exc:
                report.info(f"warning: TensorBoard events stopped at epoch {row['epoch']} "
                            f"({type(exc).__name__}: {exc})")
                self.tensorboard_uri = None
        if self.mlflow:
            try:
                if self._run_id is None:
                    self._run_id = self.mlflow.open_run(self.output, self.run_name, self.params)
                    report.info(f"logging to MLflow {self.mlflow.tracking_uri} (run {self._run_id})")
                self.mlflow.log_epoch(self._run_id, row)
            except Exception as exc:
                report.info(f"warning: MLflow logging stopped at epoch {row['epoch']} ({type(exc).__name__}: {exc})")
                self.mlflow = None

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        # tensorboardX's synchronous writer: its SummaryWriter queues events for a thread, and flush() does
        # not wait for that queue, so the copy below could miss the newest epoch.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        if self._writer is None:
            self._events_dir = tempfile.mkdtemp(prefix="lesion-ray-tensorboard-")
            self._writer = EventsWriter(os.path.join(self._events_dir, "events"))
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(row).items()]
        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(row["epoch"]),
                                                 summary=summary_pb2.Summary(value=values)))
        self._writer.flush()
        for name in os.listdir(self._events_dir):
            with open(os.path.join(self._events_dir, name), "rb") as f:
                storage.write_bytes(storage.join(self.tensorboard_uri, name), f.read())
