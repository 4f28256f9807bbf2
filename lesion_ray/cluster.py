"""Where jobs run: cluster configs (``cluster/*.yaml``).

``kind: local`` starts Ray in this process, or attaches to a cluster this machine is part of; ``kind: remote``
submits the job through the Ray Jobs API; ``kind: kuberay`` is rendered as manifests by :mod:`lesion_ray.kuberay`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lesion_ray import report, spec, storage
from lesion_ray.settings import Settings
from lesion_ray.spec import EnvName, SpecError, StorageSettings

DEFAULT_CLUSTER_FILE = "cluster/local.yaml"
MIN_LOCAL_CPUS = 8
# Secrets' names: env_vars travel in plain text (a job's runtime_env on the dashboard, KubeRay manifests).
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|PRIVATE_?KEY", re.IGNORECASE)
REGION_ENV_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int | None) -> int | None:
    """'2GB', '512MiB', 1073741824 -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"expected a size like 2GB or 512MB, got {value!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * 1024**power)


class _Cluster(BaseModel):  # the keys every kind has
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: str
    name: str = "local"
    env_vars: dict[str, str] = Field({}, description="extra environment variables for the job and its workers")
    # As written: a relative path names a folder where the job's driver runs (remote: on the cluster).
    registry: str | None = Field(None, description="model registry URI for name@version references "
                                                   f"(default: {spec.DEFAULT_REGISTRY})")
    storage: StorageSettings | None = None


class LocalCluster(_Cluster):
    kind: Literal["local"] = "local"
    address: str | None = Field(None, description="attach to a running Ray ('auto' or host:port)")
    num_cpus: int | None = Field(None, ge=1, description=f"logical CPUs (default: all, at least {MIN_LOCAL_CPUS})")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for Ray (default: all detected)")
    object_store_memory: Annotated[str | int | None, AfterValidator(parse_size)] = Field(
        "4GB", validate_default=True, description="object store size: 4GB, 512MiB or bytes (held in bytes)")

    @model_validator(mode="after")
    def _rules(self) -> LocalCluster:
        sized = [key for key in ("num_cpus", "num_gpus", "object_store_memory")  # set, to other than the default
                 if getattr(self, key) not in (None, parse_size(type(self).model_fields[key].default))]
        if self.address and sized:  # a running Ray keeps the resources its `ray start` gave it
            raise PydanticCustomError("rule", "sizes the embedded Ray only; with address the running Ray's own "
                                      "resources apply (its `ray start` options): remove it", {"key": sized[0]})
        return self


class RemoteCluster(_Cluster):
    kind: Literal["remote"] = "remote"
    address: str | None = Field(None, description="the Ray Jobs API URL, e.g. http://head:8265")
    auth_token_env: EnvName = Field("RAY_AUTH_TOKEN", description="env var holding the cluster's token")
    auth_token_file: str | None = Field("~/.ray/auth_token", description="file holding the token")
    dependencies: Literal["pinned", "installed"] = Field("pinned", description="'pinned' installs this client's "
                                                         "dependency versions; 'installed' uses the cluster's")


class KubeRayCluster(_Cluster):
    kind: Literal["kuberay"] = "kuberay"
    raycluster: str | None = Field(None, description="RayCluster manifest, relative to this file")
    image: str | None = Field(None, description="container image with lesion-ray installed")
    namespace: str = Field("default", description="Kubernetes namespace")
    auth_secret: str = Field("lesion-ray-auth", description="Secret with the cluster's Ray token (key auth_token)")
    serve_token_secret: str = Field("lesion-ray-serve-token", description="Secret with serve's API token (key token)")


ClusterConfig = Annotated[LocalCluster | RemoteCluster | KubeRayCluster, Field(discriminator="kind")]


def load_cluster(source: str | None) -> ClusterConfig:
    """The cluster config at ``source``; with None, ``cluster/local.yaml`` when present, else defaults."""
    if source is None:
        if not Path(DEFAULT_CLUSTER_FILE).exists():
            return LocalCluster()
        source = DEFAULT_CLUSTER_FILE
    data = spec.read_yaml(source)
    # Before the types are checked: an error about a secret's value must not print it.
    env_vars = data.get("env_vars")
    names = [str(name) for name in env_vars] if isinstance(env_vars, dict) else []
    if secret := next(filter(SECRET_ENV_NAME.search, names), None):
        raise SpecError(source, f"env_vars.{secret}", "looks like a secret, and env_vars are readable by everyone "
                        "with access to the Ray dashboard (the job's runtime_env) or the rendered manifests. Put it in "
                        "a file on the cluster (serve's auth_token_file), a Kubernetes Secret or the nodes' instance "
                        "role; for the embedded Ray, export it in your shell.")
    if auth := next((name for name in names if name.startswith("RAY_AUTH")), None):
        raise SpecError(source, f"env_vars.{auth}", "would change Ray's authentication, which lesion-ray keeps on "
                        "(token) for every cluster it starts or renders; remove it from env_vars")
    if setting := next((name for name in names if name in storage.ENDPOINT_ENV_VARS + REGION_ENV_VARS), None):
        raise SpecError(source, f"env_vars.{setting}", "is a storage setting: write it as storage.endpoint_url or "
                        "storage.region, so that this client, the job and its workers all use it")
    config = spec.from_dict(ClusterConfig, data, source)
    if isinstance(config, RemoteCluster) and not re.match(r"^https?://", config.address or ""):
        raise SpecError(source, "address", f"expected an http(s):// URL of the Ray dashboard, got {config.address!r}"
                        if config.address else "a remote cluster needs the Ray Jobs API URL, e.g. http://head:8265")
    if isinstance(config, KubeRayCluster):
        if not config.raycluster:
            raise SpecError(source, "raycluster", "a kuberay config names its RayCluster manifest, "
                            "e.g. kuberay/raycluster.yaml")
        if not storage.is_s3(config.raycluster) and not os.path.isabs(config.raycluster):
            config.raycluster = os.path.join(os.path.dirname(storage.normalize(source)), config.raycluster)
    return config


# --- Local ----------------------------------------------------------------------------------


def runtime_env(settings: Settings) -> dict[str, Any]:
    """The runtime_env of a job whose driver is this process: env_vars, and this process's storage settings
    installed in each worker as it starts."""
    return {"env_vars": dict(settings.env_vars), "worker_process_setup_hook": storage.installer(settings.storage)}


def start_local(config: LocalCluster, settings: Settings, log_file: str | None = None,
                verbose: bool = False) -> bool:
    """Start (or attach to) Ray for a job that runs in this process. With ``log_file``, Ray's logs go there and,
    unless ``verbose``, the console shows only lesion-ray's lines and ``MUST_SEE``; returns whether it is in use."""
    import ray
    import ray.data

    if ray.is_initialized():
        return False
    if log_file:
        _route_logs(log_file, verbose)  # before ray.init, which logs too
    job_env = runtime_env(settings)
    if config.address:
        # In a submitted job, the job's runtime_env has the env_vars already: Ray refuses to merge in the same names.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            del job_env["env_vars"]
        ray.init(address=config.address, runtime_env=job_env)
    else:
        # Ray's CPUs are scheduling slots: with too few, one stage (Train workers, Data tasks, actors) starves others.
        num_cpus = config.num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)
        ray.init(
            address="local",  # embedded: never attach to a `ray start` cluster on this machine
            num_cpus=num_cpus, num_gpus=config.num_gpus, object_store_memory=config.object_store_memory,
            runtime_env=job_env,
            # The dashboard serves the State API: without it, Train's placement-group cleaner warns every second.
            include_dashboard=True,
            _system_config={
                # As many workers may start at once as there are slots (Ray's default: one per core, warning past 4x).
                "worker_maximum_startup_concurrency": num_cpus,
                # Twice as many kept idle: stage tasks take half a CPU each, and past the soft limit (one worker per
                # slot) Ray kills a worker idle for 1 s, so the next task would start a process and import torch.
                "num_workers_soft_limit": 2 * num_cpus,
                # No workers started ahead for the driver: a job's tasks need workers with its runtime_env, so
                # those would only take the cores the job's own workers import torch on.
                "prestart_worker_first_driver": False,
            },
        )
    if log_file:
        _forward_worker_output(verbose)
    if (log_file and not verbose) or not sys.stderr.isatty():
        # lesion-ray's progress lines stand in for Ray Data's bars, which mix with them or flood a log file.
        ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    where = f" (attached to {config.address})" if config.address else " (embedded)"
    report.info(f"Ray ready: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs{where}")
    return bool(log_file)


# Ray's messages a user must see when Ray's logs go to a file: spilling, a node lost, Train workers failed/resized.
MUST_SEE = re.compile(
    r"Spilled \d+ MiB|[Nn]ode \S+ .*(dead|died|lost)|marked (as )?dead|\[FailurePolicy\]"
    r"|Deciding to resize the worker group|out of memory|OutOfMemory"
)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "py.warnings")
_worker_output = logging.getLogger("lesion_ray.ray_output")


def _route_logs(log_file: str, verbose: bool) -> None:
    """Ray's Python loggers and Python warnings write to ``log_file``; the console, unless ``verbose``, gets
    only what ``MUST_SEE`` matches."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setLevel(logging.INFO)  # Ray Data's loggers pass DEBUG too (to its own ray-data.log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setFormatter(logging.Formatter("[lesion-ray] ray: %(message)s"))
    to_console.addFilter(lambda record: bool(MUST_SEE.search(record.getMessage())))
    logging.captureWarnings(True)
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not verbose:
            for handler in list(logger.handlers):
                # Ray's own session files (e.g. ray-data.log) stay; its console handlers go.
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
            logger.addHandler(to_console)
        logger.addHandler(to_file)
        logger.propagate = False  # each record once, whichever of these loggers it was sent to
    _worker_output.addHandler(to_file)
    _worker_output.setLevel(logging.INFO)
    _worker_output.propagate = False


def _forward_worker_output(verbose: bool) -> None:
    """Workers' output (``log_to_driver``) goes to the log file; unless ``verbose``, the console gets only
    lesion-ray's lines and ``MUST_SEE`` lines, without Ray's ``(Actor pid=...)`` prefix."""
    # No public hook: Ray's driver hands forwarded lines to this dispatcher, whose "ray_print_logs" prints them.
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    def handle(data: dict[str, Any]) -> None:
        source = data.get("actor_name") or data.get("task_name")
        prefix = f"({source + ' ' if source else ''}pid={data.get('pid')})"
        for line in data.get("lines", []):
            _worker_output.info("%s %s", prefix, line)
            if verbose:
                continue
            if line.startswith(report.PREFIX):
                report.info(line[len(report.PREFIX):].strip())
            elif MUST_SEE.search(line):
                report.info(f"ray: {line.strip()}")

    if not verbose:
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("lesion_ray_output", handle)


# --- Remote ---------------------------------------------------------------------------------


class RemoteError(Exception):
    """The remote cluster refused or failed a request; the message says what to do."""


def _token(config: RemoteCluster) -> str | None:
    token = os.environ.get(config.auth_token_env)
    if not token and config.auth_token_file:
        path = Path(config.auth_token_file).expanduser()
        if path.is_file():
            token = path.read_text().strip()
    return token or None


def job_client(config: RemoteCluster):
    from ray.job_submission import JobSubmissionClient

    token = _token(config)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return _request(config, JobSubmissionClient, config.address, headers=headers)


def _request(config: RemoteCluster, fn, *args, **kwargs):
    # A cluster that just started takes submissions before its job agent is up: wait for it, briefly.
    deadline = time.monotonic() + 120
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the SDK raises bare ConnectionError/RuntimeError
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise RemoteError(_explain(exc, config)) from None
        time.sleep(2)


def _explain(exc: Exception, config: RemoteCluster) -> str:
    text = str(exc)
    where = f"${config.auth_token_env}" + (f" or {config.auth_token_file}" if config.auth_token_file else "")
    if re.search(r"\b401\b", text) or "Missing authentication token" in text or "Authentication required" in text:
        return (f"the cluster at {config.address} requires a token and none was sent. Put the cluster's token "
                f"(`ray get-auth-token` on the head node) in {where}, or set auth_token_env/auth_token_file in the "
                "cluster config.")
    if re.search(r"\b403\b", text) or "Invalid authentication token" in text:
        source = where if _token(config) else "Ray's own defaults ($RAY_AUTH_TOKEN, ~/.ray/auth_token)"
        return (f"the cluster at {config.address} rejected the token from {source}: it is not this cluster's. "
                "Get the right one with `ray get-auth-token` on the head node.")
    if "Failed to connect" in text or "Connection refused" in text or "ConnectionError" in type(exc).__name__:
        return f"cannot reach the Ray Jobs API at {config.address}: is the cluster up and the address right?"
    return f"request to {config.address} failed: {text.splitlines()[0] if text else type(exc).__name__}"


def pinned_requirements() -> list[str]:
    """This client's dependency versions, so the job runs on what was tested here; not Ray: the cluster's stays."""
    pins = []
    for requirement in importlib.metadata.requires("lesion-ray") or []:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
        if "extra ==" not in requirement and name.lower() != "ray":
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
    return pins


def driver_files(job: spec.JobSpec, config: RemoteCluster | KubeRayCluster) -> dict[str, str]:
    """``job.yaml`` and ``cluster.yaml`` for the job's driver, ``lesion-ray run`` on the cluster itself."""
    inside = {"kind": "local", "name": config.name, "address": "auto", "registry": config.registry}
    return {"job.yaml": yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False),
            "cluster.yaml": yaml.safe_dump(inside, sort_keys=False)}


def submit(job: spec.JobSpec, config: RemoteCluster, settings: Settings, wait: bool = True,
           verbose: bool = False) -> int:
    """Submit ``job`` to a remote cluster; stream its logs; return a process exit status."""
    client, job_id = start_job(job, config, settings, verbose=verbose)
    report.info(f"submitted {job.kind} '{job.name}' to {config.address} as {job_id}")
    return follow(client, job_id) if wait else 0


def start_job(job: spec.JobSpec, config: RemoteCluster, settings: Settings,
              verbose: bool = False) -> tuple[Any, str]:
    """Submit ``job`` to a remote cluster and return (Jobs API client, job id) without waiting. Its driver,
    ``lesion-ray run`` there, gets ``settings``' env_vars and storage through the job's runtime_env."""
    client = job_client(config)
    with tempfile.TemporaryDirectory(prefix="lesion-ray-job-", ignore_cleanup_errors=True) as folder:
        workdir, package = Path(folder), Path(__file__).resolve().parent
        shutil.copytree(package, workdir / "lesion_ray", ignore=shutil.ignore_patterns("__pycache__"))
        for filename, text in driver_files(job, config).items():
            (workdir / filename).write_text(text)
        runtime_env: dict[str, Any] = {"working_dir": str(workdir), "env_vars": settings.job_environment()}
        if config.dependencies == "pinned":
            runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
        name = re.sub(r"[^a-zA-Z0-9-]", "-", job.name)
        submission_id = f"lesion-ray-{name}-{int(time.time())}-{uuid.uuid4().hex[:6]}"  # unique within a second too
        job_id = _request(
            config,
            client.submit_job,
            entrypoint="python -m lesion_ray.cli run job.yaml --cluster cluster.yaml" + " --verbose" * verbose,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"lesion_ray_kind": job.kind, "lesion_ray_name": job.name},
        )
    return client, job_id


def follow(client, job_id: str) -> int:
    """Stream a job's logs until it ends; 0 when it succeeded."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        report.info(f"stopped following; the job goes on. Stop it with: lesion-ray jobs stop {job_id} --cluster ...")
        return 130
    status = str(client.get_job_status(job_id))
    info = client.get_job_info(job_id)
    report.info(f"job {job_id} ended: {status}" + (f" ({info.message})" if info.message else ""))
    return 0 if status.endswith("SUCCEEDED") else 1


def list_jobs(config: RemoteCluster) -> list[dict[str, Any]]:
    jobs = _request(config, job_client(config).list_jobs)
    return [{
        "id": job.submission_id or job.job_id,
        "status": str(job.status).rsplit(".", 1)[-1],
        "kind": (job.metadata or {}).get("lesion_ray_kind", "-"),
        "name": (job.metadata or {}).get("lesion_ray_name", "-"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000)),
    } for job in sorted(jobs, key=lambda j: j.start_time or 0)]


def job_logs(config: RemoteCluster, job_id: str) -> str:
    return _request(config, job_client(config).get_job_logs, job_id)


def stop_job(config: RemoteCluster, job_id: str) -> bool:
    return _request(config, job_client(config).stop_job, job_id)
