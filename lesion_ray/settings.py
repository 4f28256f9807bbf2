"""What a job needs to know besides its spec: where storage is, which registry, where logs go.

The CLI builds one :class:`Settings` from the cluster config and the spec (:meth:`Settings.build`) and
passes it to ``run(spec, settings)``; Ray workers get its storage part when they start
(:func:`lesion_ray.cluster.runtime_env`). Nothing here is written to the environment: the
environment is only read for the AWS SDKs' own variables, once, when the settings are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lesion_ray import storage
from lesion_ray.spec import default_registry

if TYPE_CHECKING:
    from lesion_ray.cluster import ClusterConfig
    from lesion_ray.spec import JobSpec

LOG_FOLDER = "runs"  # runs/<job name>/lesion-ray.log, under the working directory


@dataclass(frozen=True)
class Settings:
    storage: storage.S3Config = field(default_factory=storage.S3Config)
    # For name@version references where the spec names no registry: the cluster config's, made absolute here
    # (so that workers in other folders agree); a driver on another cluster resolves the config's own value.
    registry: str = field(default_factory=default_registry)
    log_folder: str = field(default_factory=lambda: storage.normalize(LOG_FOLDER))
    # The cluster config's env_vars: for the job's Ray workers (their runtime_env), never this process.
    env_vars: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, config: ClusterConfig | None = None, job: JobSpec | None = None) -> Settings:
        """The settings of ``job`` on the cluster ``config``: each storage setting from the spec's ``storage:``,
        else the cluster config's, else the AWS variables; the cluster config's registry (default
        ``runs/registry``) and env_vars."""
        sections = [s for s in (job.storage if job else None, config.storage if config else None) if s]
        endpoint = next((s.endpoint_url for s in sections if s.endpoint_url), None)
        region = next((s.region for s in sections if s.region), None)
        return cls(
            storage=storage.S3Config.from_environment(endpoint, region),
            registry=storage.normalize(config.registry) if config and config.registry else default_registry(),
            env_vars=dict(config.env_vars) if config else {},
        )

    def job_environment(self) -> dict[str, str]:
        """Environment variables for a job driver started elsewhere (a submitted job's runtime_env, KubeRay
        pods), which builds its own settings from them: the env_vars and the storage settings. No secrets."""
        return {**self.storage.environment(), **self.env_vars}
