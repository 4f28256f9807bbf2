"""Checkpoints and the model registry: how a trained model is stored, named and loaded.

A *model folder* holds ``model.pt`` (a plain ``state_dict``: tensors only, no ``module.`` prefix, loadable with
``torch.load`` + ``load_state_dict`` anywhere) and ``config.json`` (architecture, task, input size, threshold).
Training checkpoints, a run's ``best_model/`` and registry versions are all model folders. The registry layout::

    <registry>/<name>/<version>/claim.json   {"host", "pid", "time"} of the publisher
    <registry>/<name>/<version>/{model.pt, metrics.json, training.json, config.json}
    <registry>/<name>/latest.json            {"name", "version", "uri"}

A version exists once its config.json does (see :func:`publish`); versions are never overwritten, and latest.json
only moves forward. A model reference (:class:`ModelRef`) is ``name@latest``, ``name@3``, ``<registry>/name@latest``,
a ``model.pt`` URI, a model folder, or a train run's output folder (its ``best_model/``).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from lesion_ray import storage
from lesion_ray.models import ModelConfig, build_model, load_tensors
from lesion_ray.spec import CheckContext, CheckedStr, default_registry

MODEL_FILE, CONFIG_FILE, METRICS_FILE, LATEST_FILE = "model.pt", "config.json", "metrics.json", "latest.json"
TRAINING_FILE = "training.json"  # the train spec and metrics history that made the model (when it was trained here)
CLAIM_FILE = "claim.json"
BEST_MODEL_DIR = "best_model"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REGISTRY_REF = re.compile(rf"^(?:(?P<registry>.+)/)?(?P<name>{NAME_PATTERN})@(?P<version>latest|\d+)$")


# --- Model folders -----------------------------------------------------------------------------


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU tensors without any training wrapper (DDP, DataParallel) or ``module.`` prefix."""
    model = getattr(model, "module", model)
    return {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state_dict file as saved here, by ``nn.DataParallel``/DDP (``module.`` keys) or wrapped
    in ``{"state_dict": ...}`` / ``{"model": ...}`` as many training scripts save it."""
    state = load_tensors(uri, "Save the weights with torch.save(model.state_dict(), path).")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{uri} is not a PyTorch state_dict: save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def config_to_json(config: ModelConfig, threshold: float) -> dict[str, Any]:
    # The encoder weights are inside model.pt now: loading must not ask for the VGG16 file again.
    return {**config.model_dump(), "pretrained_encoder": None, "threshold": threshold}


def save_model_dir(uri: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(storage.join(uri, MODEL_FILE), buf.getvalue())
    storage.write_text(storage.join(uri, CONFIG_FILE), json.dumps(config, indent=2))


# --- The registry ------------------------------------------------------------------------------


def versions(name: str, registry: str | None = None) -> list[int]:
    """The published versions of ``name``, ascending (empty when there are none)."""
    return sorted(_numbered(storage.join(registry or default_registry(), name), CONFIG_FILE))


def _numbered(root: str, filename: str | None = None) -> set[int]:
    """The numbers of the version folders under ``root`` that hold ``filename`` (None: any file)."""
    if not storage.exists(root):
        return set()
    suffixes = (f"/{filename}",) if filename else None
    root = storage.normalize(root)
    folders = (storage.parent(info.uri) for info in storage.list_files(root, suffixes=suffixes))
    # Only the root's own sub-folders: for a model named "2018", the root itself is no version 2018.
    return {int(storage.basename(f)) for f in folders if storage.parent(f) == root and storage.basename(f).isdigit()}


def publish(model_dir: str, name: str, metrics: dict[str, Any], registry: str | None = None,
            training: dict[str, Any] | None = None) -> str:
    """Copy a model folder (and ``training``: the train spec and metrics history) into the registry as the next
    version of ``name``; returns ``name@N``.

    Safe when several trainings publish one name at once: each claims its own N by creating ``N/claim.json``
    exclusively (local: a hard link that fails when the name is taken; S3: a PUT with ``If-None-Match: *``), then
    creates the files the same way, config.json last, so nothing is overwritten and a version is visible only once
    complete. latest.json then moves to N by compare-and-swap unless it points higher already. A publisher that
    dies after its claim leaves that number claimed but never visible; later versions take higher numbers."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"model name {name!r} may hold only letters, digits, '.', '_' and '-'")
    registry = storage.normalize(registry or default_registry())
    root = storage.join(registry, name)
    # Read the source first: a missing file must not cost a version number.
    weights = storage.read_bytes(storage.join(model_dir, MODEL_FILE))
    config = json.loads(storage.read_text(storage.join(model_dir, CONFIG_FILE)))
    version = _claim_version(root)
    target = storage.join(root, str(version))
    files = [(MODEL_FILE, weights), (METRICS_FILE, _json_bytes(metrics)),
             *([(TRAINING_FILE, _json_bytes(training))] if training is not None else []),
             (CONFIG_FILE, _json_bytes({**config, "name": name, "version": version}))]
    for filename, data in files:
        uri = storage.join(target, filename)
        if not storage.create_exclusive(uri, data):
            raise storage.StorageError(f"{uri} already exists although this process claimed {name}@{version}: "
                                       "something other than lesion-ray writes into the registry")
    _advance_latest(root, {"name": name, "version": version, "uri": target})
    return f"{name}@{version}"


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2).encode("utf-8")


def _claim_version(root: str) -> int:
    """The lowest free number above every version folder under ``root``, now claimed by this process."""
    owner = _json_bytes({"host": socket.gethostname(), "pid": os.getpid(),
                         "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    version = max(_numbered(root), default=0) + 1
    while not storage.create_exclusive(storage.join(root, str(version), CLAIM_FILE), owner):
        version += 1
    return version


def _advance_latest(root: str, latest: dict[str, Any]) -> None:
    """Point latest.json at ``latest`` unless a concurrent publisher already moved it past it."""
    uri = storage.join(root, LATEST_FILE)
    while True:
        current = storage.read_with_tag(uri)
        if current and json.loads(current[0])["version"] >= latest["version"]:
            return
        if storage.replace_if_unchanged(uri, _json_bytes(latest), current[1] if current else None):
            return


@dataclass(frozen=True)
class Resolved:
    """Where a model reference points: its model folder and, for registry refs, name and version."""

    model_dir: str
    model_file: str
    name: str
    version: str


def resolve(ref: str, registry: str | None = None) -> Resolved:
    """Find the model folder that ``ref`` names; raises StorageError saying what is missing."""
    match = _REGISTRY_REF.match(ref)
    if match:
        registry = storage.normalize(match["registry"] or registry or default_registry())
        name, version = match["name"], match["version"]
        if version == "latest":
            latest_uri = storage.join(registry, name, LATEST_FILE)
            if not storage.exists(latest_uri):
                raise storage.StorageError(f"model '{name}' is not in the registry {registry} (no {LATEST_FILE}): "
                                           f"train it first (kind: train, model_name: {name}) or give the registry "
                                           f"URI as <registry>/{name}@latest")
            version = str(json.loads(storage.read_text(latest_uri))["version"])
        model_dir = storage.join(registry, name, version)
        # config.json is written last: a version without it is still being published.
        if not storage.exists(storage.join(model_dir, CONFIG_FILE)):
            have = ", ".join(str(v) for v in versions(name, registry)) or "none"
            raise storage.StorageError(f"model {name}@{version} is not in the registry {registry} (versions: {have})")
        return Resolved(model_dir, storage.join(model_dir, MODEL_FILE), name, version)
    uri = storage.normalize(ref)
    if uri.endswith(".pt"):
        if not storage.exists(uri):
            raise storage.StorageError(f"no model file at {ref}")
        model_dir, model_file = storage.parent(uri), uri
    else:
        for model_dir in (uri, storage.join(uri, BEST_MODEL_DIR)):
            model_file = storage.join(model_dir, MODEL_FILE)
            if storage.exists(model_file):
                break
        else:
            raise storage.StorageError(f"no model at {ref}: expected name@latest, name@N, a model.pt, a folder with "
                                       f"model.pt and config.json, or a finished train run's output "
                                       f"(with {BEST_MODEL_DIR}/)")
    if not storage.exists(storage.join(model_dir, CONFIG_FILE)):
        raise storage.StorageError(f"{model_file} has no {CONFIG_FILE} beside it: the architecture is unknown")
    config = json.loads(storage.read_text(storage.join(model_dir, CONFIG_FILE)))
    return Resolved(model_dir, model_file, str(config.get("name", storage.basename(model_dir))),
                    str(config.get("version", "")))


class ModelRef(CheckedStr):
    """A model a job loads: checked to exist unless an earlier pipeline step trains it."""

    expected = ("a model: name@latest, name@N, <registry uri>/name@latest, a model.pt URI, "
                "a model folder or a train run's output folder")

    @classmethod
    def canonical(cls, value: str) -> str:
        # Paths become absolute (Ray workers run in other folders); a bare name@version stays.
        match = _REGISTRY_REF.match(value)
        if match and match["registry"]:
            return f"{storage.normalize(match['registry'])}/{match['name']}@{match['version']}"
        return value if match else storage.normalize(value)

    def check(self, ctx: CheckContext) -> None:
        match = _REGISTRY_REF.match(self)
        if match:
            if f"model:{match['name']}" in ctx.produced:
                return
            registry = match["registry"] or ctx.registry
            if not ctx.check_local_paths and not storage.is_s3(storage.normalize(registry)):
                return
        elif ctx.skip(self):
            return
        resolve(self, ctx.registry)


# --- Loading -----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    threshold: float
    name: str
    version: str
    metrics: dict[str, Any]
    uri: str


def model_card(model_dir: str) -> dict[str, Any]:
    """What a report says about a model folder: its config.json, metrics.json and training.json
    (``{}`` for a file it lacks, e.g. a model trained elsewhere)."""
    return {"uri": model_dir, "config": _json_or_empty(model_dir, CONFIG_FILE),
            "metrics": _json_or_empty(model_dir, METRICS_FILE), "training": _json_or_empty(model_dir, TRAINING_FILE)}


def _json_or_empty(model_dir: str, filename: str) -> dict[str, Any]:
    uri = storage.join(model_dir, filename)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def read_config(model_dir: str) -> tuple[ModelConfig, float]:
    """A model folder's config.json: (model config, mask threshold)."""
    data = json.loads(storage.read_text(storage.join(model_dir, CONFIG_FILE)))
    fields = {k: v for k, v in data.items() if k in ModelConfig.model_fields}
    return ModelConfig(**fields), float(data.get("threshold", 0.5))


def load_model(ref: str, registry: str | None = None, device: str = "cpu") -> LoadedModel:
    """Build the model ``ref`` names, load its weights, and put it in eval mode on ``device``."""
    found = resolve(ref, registry)
    config, threshold = read_config(found.model_dir)
    model = build_model(config)
    state = read_state_dict(found.model_file)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{found.model_file} does not fit its {CONFIG_FILE} ({config}): {exc}") from None
    return LoadedModel(model.to(device).eval(), config, threshold, found.name, found.version,
                       _json_or_empty(found.model_dir, METRICS_FILE), found.model_dir)
