"""The model deployment: batches the images of all clients into one forward pass and follows
``name@latest``, swapping a new version in once it has loaded and passed a check."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from lesion_ray import inference, registry, storage
from lesion_ray.data import ATTRIBUTES
from lesion_ray.postprocess import Postprocess, to_masks
from lesion_ray.serve.config import ServeSpec

logger = logging.getLogger("ray.serve")
LABELS = {1: ("lesion",), 2: ATTRIBUTES}  # what each task's mask channels and head-1 scores stand for


@dataclass
class Prediction:
    """The model's answer for one image at the model's input size."""

    probs: np.ndarray          # float16 [C, S, S] mask probabilities
    scores: list[float]        # [C] head-1 probabilities ("lesion" / attribute present)
    threshold: float
    name: str
    version: str
    task: int
    input_size: int
    postprocess: Postprocess = "largest_component"


@dataclass
class Served:
    """A model version as a replica runs it: its registry entry and its :class:`lesion_ray.inference.Runner`."""

    loaded: registry.LoadedModel
    runner: inference.Runner

    @classmethod
    def of(cls, loaded: registry.LoadedModel, device: str = "cpu",
           runtime: inference.ModelRuntime | None = None, batch_size: int = 1) -> Served:
        runtime = runtime or inference.ModelRuntime()
        return cls(loaded, inference.Runner(loaded.model, device, runtime, loaded.config.input_size, batch_size))


def check_model(served: Served) -> None:
    """Raise when a forward pass on a grey image fails or gives NaN/inf (broken weights)."""
    config = served.loaded.config
    side = config.input_size if served.runner.compiled else config.downsampling  # a compiled model: one shape
    outputs = served.runner(torch.full((1, 3, side, side), 128, dtype=torch.uint8))
    if not all(torch.isfinite(o).all() for o in outputs):
        raise RuntimeError(f"model {served.loaded.name}@{served.loaded.version} gives NaN/inf outputs: "
                           "its weights are broken")


def forward(served: Served, inputs: list[np.ndarray], threshold: float | None = None,
            postprocess: Postprocess = "largest_component") -> list[Prediction]:
    """One forward pass over a batch of :func:`lesion_ray.serve.ingress.prepare` outputs (uint8 [3, S, S])."""
    loaded, size = served.loaded, served.loaded.config.input_size
    # Each on its own: around a swap to a version with another input size, one batch can hold both sizes.
    x = torch.stack([inference.resize(torch.from_numpy(image), size) for image in inputs])
    probs, head1, _ = served.runner(x)
    cut = loaded.threshold if threshold is None else threshold
    return [Prediction(p, s, cut, loaded.name, loaded.version, loaded.config.task, size, postprocess)
            for p, s in zip(probs.half().cpu().numpy(), head1.tolist(), strict=True)]


def masks_at(pred: Prediction, orig: tuple[int, int]) -> np.ndarray:
    """bool [C, H, W]: probabilities resized to the original size, thresholded and post-processed, as predict does."""
    return to_masks(pred.probs, *orig, pred.threshold, pred.postprocess)


@serve.deployment  # its resources (CPUs, GPUs): build_app
class SegmentationModel:
    async def __init__(self, spec: ServeSpec, storage_config: storage.S3Config) -> None:
        storage.configure(storage_config)  # also where no driver's setup hook reaches (serve deploy, RayService)
        self.spec = spec
        self.batches = self.images = 0  # this replica's forward passes and the images in them
        self.refused: dict[str, str] | None = None  # the newest version that could not be served, and why
        self.served = await asyncio.to_thread(self._load, spec.model)
        self.predict.set_max_batch_size(spec.max_batch_size)
        self.predict.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        follow = spec.model.endswith("@latest") and spec.poll_latest_s > 0
        self._follower = asyncio.create_task(self._follow_latest()) if follow else None

    def _load(self, ref: str) -> Served:
        loaded = registry.load_model(ref, self.spec.registry)
        device = "cuda" if self.spec.gpus_per_replica else "cpu"
        served = Served.of(loaded, device, self.spec, self.spec.max_batch_size)
        check_model(served)
        logger.info(f"loaded model {loaded.name}@{loaded.version} from {loaded.uri} on {device}")
        return served

    async def _follow_latest(self) -> None:
        while True:
            await asyncio.sleep(self.spec.poll_latest_s)
            current = f"{self.served.loaded.name}@{self.served.loaded.version}"
            try:
                version = (await asyncio.to_thread(registry.resolve, self.spec.model, self.spec.registry)).version
            except Exception as exc:  # storage hiccups: look again at the next poll
                logger.warning(f"staying on {current}: cannot read the registry: {type(exc).__name__}: {exc}")
                continue
            if version == self.served.loaded.version or (self.refused and version == self.refused["version"]):
                continue  # a version that failed to load or check is not tried again
            try:
                # Loaded and checked beside the current model while requests keep flowing; then one assignment.
                pinned = self.spec.model.removesuffix("@latest") + f"@{version}"
                self.served = await asyncio.to_thread(self._load, pinned)
                self.refused = None  # a good newer version replaces any refused one
            except Exception as exc:  # broken weights, a config that does not fit, an unreadable file
                self.refused = {"version": version, "reason": str(exc)[:500]}
                logger.warning(f"staying on {current}: version {version} cannot be served: {exc}")

    @serve.batch
    async def predict(self, inputs: list[np.ndarray]) -> list[Prediction]:
        served = self.served  # one model for the whole batch, even if a swap lands meanwhile
        self.batches += 1
        self.images += len(inputs)
        return await asyncio.to_thread(forward, served, inputs, self.spec.threshold, self.spec.postprocess)

    def info(self) -> dict[str, Any]:
        loaded = self.served.loaded
        return {
            "name": loaded.name, "version": loaded.version, "task": loaded.config.task,
            "architecture": loaded.config.architecture, "input_size": loaded.config.input_size,
            "threshold": loaded.threshold if self.spec.threshold is None else self.spec.threshold,
            "postprocess": self.spec.postprocess,
            "labels": list(LABELS[loaded.config.task]), "metrics": loaded.metrics, "refused_version": self.refused,
            "replica": {"batches": self.batches, "images": self.images, "device": str(self.served.runner.device),
                        "precision": self.spec.precision, "compiled": self.served.runner.compiled},
        }

    def check_health(self) -> None:
        check_model(self.served)
