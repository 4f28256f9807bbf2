"""KubeRay manifests for a job spec: a RayJob for batch work (the spec in a ConfigMap mounted into the head pod),
a RayService for ``kind: serve`` (the spec as its Serve config's args). Both embed the RayCluster the cluster
config names and start authenticated, with tokens from Secrets: no token value is ever in the manifests.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from lesion_ray import spec
from lesion_ray.cluster import KubeRayCluster, driver_files
from lesion_ray.settings import Settings
from lesion_ray.spec import JobSpec, SpecError

SPEC_MOUNT = "/home/ray/lesion-ray-job"
SERVE_TOKEN_MOUNT = "/etc/lesion-ray/serve-token"
SERVE_TOKEN_KEY = "token"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName requires
AUTH_ENV_NAMES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def _cluster_spec(config: KubeRayCluster, settings: Settings) -> dict[str, Any]:
    manifest = spec.read_yaml(config.raycluster or "")
    if manifest.get("kind") != "RayCluster" or "spec" not in manifest:
        raise SpecError(config.raycluster or "", "kind", "expected a ray.io/v1 RayCluster manifest")
    cluster_spec = copy.deepcopy(manifest["spec"])
    # KubeRay >= 1.6.0 (secretName): only through authOptions does the operator give the token to the
    # RayJob submitter pod and to its own dashboard calls (RayService deploys, RayJob status).
    cluster_spec["authOptions"] = {**cluster_spec.get("authOptions", {}), "mode": "token",
                                   "secretName": config.auth_secret}
    # On the Ray containers too (the operator keeps variables already set): should an older operator
    # ignore authOptions, the cluster still starts authenticated and its jobs fail instead of running open.
    auth = [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": config.auth_secret, "key": RAY_TOKEN_KEY}}}]
    env = [{"name": k, "value": v} for k, v in sorted(settings.job_environment().items())]
    for template in _pod_templates(cluster_spec):
        for container in template["spec"]["containers"]:
            if config.image:
                container["image"] = config.image
            own = [e for e in container.get("env", []) if e["name"] not in AUTH_ENV_NAMES]
            container["env"] = [*own, *auth, *env]
    return cluster_spec


def _pod_templates(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


def _mount(templates: list[dict[str, Any]], name: str, source: dict[str, Any], path: str) -> None:
    """Add volume ``name`` (a configMap or secret ``source``) to ``templates``, mounted read-only at ``path``."""
    for template in templates:
        template["spec"].setdefault("volumes", []).append({"name": name, **source})
        for container in template["spec"]["containers"]:
            container.setdefault("volumeMounts", []).append({"name": name, "mountPath": path, "readOnly": True})


def render(job: JobSpec, config: KubeRayCluster, settings: Settings) -> list[dict[str, Any]]:
    """The manifests to ``kubectl apply`` for ``job``; the pods get ``settings``' env_vars and storage."""
    name = re.sub(r"[^a-z0-9-]+", "-", job.name.lower())[:50].strip("-") or "lesion-ray"  # a DNS label
    labels = {"app.kubernetes.io/name": "lesion-ray", "lesion-ray/kind": job.kind}
    metadata = {"name": name, "namespace": config.namespace, "labels": labels}
    cluster_spec = _cluster_spec(config, settings)
    if job.kind == "serve":
        from lesion_ray import serve

        # Every node may run the HTTP ingress, so every pod gets the serve token file.
        _mount(_pod_templates(cluster_spec), "serve-token", {"secret": {"secretName": config.serve_token_secret}},
               SERVE_TOKEN_MOUNT)
        # Listening on every interface of the pod, so its Kubernetes Service reaches it: with the token required.
        # The Serve config is all the application gets: it names the cluster config's registry too.
        job = job.model_copy(update={"auth_token_env": None, "host": "0.0.0.0",
                                     "auth_token_file": f"{SERVE_TOKEN_MOUNT}/{SERVE_TOKEN_KEY}",
                                     "registry": job.registry or config.registry})
        serve_config = yaml.safe_dump(serve.serve_config(job), sort_keys=False)
        return [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata,
                 "spec": {"serveConfigV2": serve_config, "rayClusterConfig": cluster_spec}}]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**metadata, "name": f"{name}-spec"},
                  "data": driver_files(job, config)}
    _mount([cluster_spec["headGroupSpec"]["template"]], "lesion-ray-job", {"configMap": {"name": f"{name}-spec"}},
           SPEC_MOUNT)
    entrypoint = f"python -m lesion_ray.cli run {SPEC_MOUNT}/job.yaml --cluster {SPEC_MOUNT}/cluster.yaml"
    ray_job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata,
               "spec": {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                        "backoffLimit": 2, "rayClusterSpec": cluster_spec}}
    return [config_map, ray_job]
