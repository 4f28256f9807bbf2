"""``kind: pipeline``: run other job specs in order, later steps naming earlier steps' keys.

A step is an inline spec, or ``file: other.yaml`` (relative to this spec) with keys that
override the file's. Strings may say ``${<step name>.<key>}`` to use an earlier step's
value (after defaults), e.g. ``data: ${synth.output}``; references are resolved before
validation, so a whole pipeline is checked before its first step runs.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from lesion_ray import report, spec, storage
from lesion_ray.settings import Settings
from lesion_ray.spec import CheckContext, JobSpec, SpecError

_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_-]+)+)\}")


class PipelineSpec(JobSpec):
    kind: Literal["pipeline"] = "pipeline"
    steps: list[dict[str, Any]] = Field(description="job specs to run in order (inline, or file: path)")
    # The parsed steps; `steps` then holds them as plain, self-contained data.
    _jobs: list[JobSpec] = PrivateAttr(default_factory=list)

    @property
    def jobs(self) -> list[JobSpec]:
        return self._jobs

    @model_validator(mode="after")
    def _parse_steps(self, info: ValidationInfo) -> PipelineSpec:
        # Step files are relative to this spec's file, and step errors name it (spec.from_dict's context).
        source, path = (info.context or {}).get("source", "pipeline"), (info.context or {}).get("path", "")
        if not self.steps:
            raise SpecError(source, spec.key_path(path, "steps"), "a pipeline needs at least one step")
        resolved: dict[str, dict[str, Any]] = {}
        for index, raw in enumerate(self.steps):
            where = spec.key_path(spec.key_path(path, "steps"), index)
            data = _interpolate(_load_step(raw, source, where), resolved, source, where)
            if data.get("kind") in ("pipeline", "serve"):
                raise SpecError(source, f"{where}.kind", "a pipeline step cannot be a pipeline or a serve job "
                                                         "(serve runs until stopped: run it on its own)")
            job = spec.parse(data, source, where)
            if job.name in resolved:
                raise SpecError(source, f"{where}.name", f"step name '{job.name}' is used twice")
            resolved[job.name] = job.model_dump(mode="json")
            self._jobs.append(job)
        self.steps = list(resolved.values())
        return self

    def check(self, ctx: CheckContext) -> None:
        for job in self.jobs:
            job.check(ctx)
            ctx.produced.extend(job.produces())

    def produces(self) -> list[str]:
        return [item for job in self.jobs for item in job.produces()]


SPEC = PipelineSpec


def _load_step(raw: Any, source: str, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SpecError(source, where, "expected a job spec mapping, or a mapping with file: PATH")
    if "file" not in raw:
        return dict(raw)
    overrides = {k: v for k, v in raw.items() if k != "file"}
    step_file = str(raw["file"])
    if not storage.is_s3(step_file) and not os.path.isabs(step_file):
        step_file = os.path.join(os.path.dirname(storage.normalize(source)), step_file)
    return _merge(spec.read_yaml(step_file), overrides)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _interpolate(value: Any, resolved: dict[str, dict[str, Any]], source: str, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, resolved, source, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, resolved, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match) -> Any:
        step, keys = match.group(1), match.group(2).strip(".").split(".")
        if step not in resolved:
            known = ", ".join(resolved) or "none yet"
            raise SpecError(source, where, f"${{{step}...}} names no earlier step (earlier steps: {known})")
        node: Any = resolved[step]
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise SpecError(source, where, f"step '{step}' has no key '{'.'.join(keys)}'")
            node = node[key]
        return node

    whole = _REFERENCE.fullmatch(value)
    if whole:  # a value that is only a reference keeps its type (numbers stay numbers)
        return resolve(whole)
    return _REFERENCE.sub(lambda m: str(resolve(m)), value)


def run(pipeline: PipelineSpec, settings: Settings) -> dict[str, Any]:
    """Run the steps in order, a line for each; the pipeline's summary names where all went."""
    summary: dict[str, Any] = {}
    result: dict[str, Any] = {}
    for index, job in enumerate(pipeline.jobs, start=1):
        report.info(f"step {index}/{len(pipeline.jobs)}: {job.kind} '{job.name}'")
        step_start = time.monotonic()
        result = spec.job_module(job.kind, job.name).run(job, settings)
        seconds = time.monotonic() - step_start
        # One line per step (its numbers; its paths are in the closing summary), so a pipeline's console
        # stays short: the last step's whole summary closes the pipeline's.
        numbers = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in result.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool))
        report.info(f"{job.kind} '{job.name}' done in {seconds:.1f}s" + (f": {numbers}" if numbers else ""))
        summary[f"{job.name} ({job.kind})"] = f"{seconds:.1f}s -> {getattr(job, 'output', '')}"
    # The last step's results (for the quickstart: the scores) close the summary; the whole time, Ray's start
    # included, is in its title ("... finished in").
    summary.update({f"{pipeline.jobs[-1].name}.{key}": value for key, value in result.items()})
    return summary
