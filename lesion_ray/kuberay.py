"""KubeRay manifests for a job spec: a RayJob for batch work, a RayService for ``kind: serve``.

Both embed the RayCluster named by the ``kind: kuberay`` cluster config, so the cluster shape
lives in one file (``cluster/kuberay/raycluster.yaml``). A RayJob carries the spec unchanged in
a ConfigMap mounted into the head pod; a RayService carries it as its Serve config's args.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from lesion_ray import spec
from lesion_ray.cluster import ClusterConfig
from lesion_ray.spec import JobSpec, SpecError

SPEC_MOUNT = "/home/ray/lesion-ray-job"


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:50] or "lesion-ray"


def _cluster_spec(config: ClusterConfig) -> dict[str, Any]:
    manifest = spec.read_yaml(config.raycluster or "")
    if manifest.get("kind") != "RayCluster" or "spec" not in manifest:
        raise SpecError(config.raycluster or "", "kind", "expected a ray.io/v1 RayCluster manifest")
    cluster_spec = copy.deepcopy(manifest["spec"])
    env = [{"name": k, "value": v} for k, v in sorted(config.worker_env().items())]
    for template in _pod_templates(cluster_spec):
        for container in template["spec"]["containers"]:
            if config.image:
                container["image"] = config.image
            if env:
                container["env"] = [*container.get("env", []), *env]
    return cluster_spec


def _pod_templates(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


def render(job: JobSpec, config: ClusterConfig) -> list[dict[str, Any]]:
    """The manifests to ``kubectl apply`` for ``job`` on the KubeRay cluster ``config``."""
    name = _dns_name(job.name)
    labels = {"app.kubernetes.io/name": "lesion-ray", "lesion-ray/kind": job.kind}
    metadata = {"name": name, "namespace": config.namespace, "labels": labels}
    cluster_spec = _cluster_spec(config)
    if job.kind == "serve":
        from lesion_ray import serve

        return [{
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": metadata,
            "spec": {
                "serveConfigV2": yaml.safe_dump(serve.serve_config(job), sort_keys=False),
                "rayClusterConfig": cluster_spec,
            },
        }]
    inside = {"kind": "local", "name": config.name, "address": "auto", "registry": config.registry}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**metadata, "name": f"{name}-spec"},
        "data": {
            "job.yaml": yaml.safe_dump(spec.to_dict(job), sort_keys=False),
            "cluster.yaml": yaml.safe_dump(inside, sort_keys=False),
        },
    }
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    head.setdefault("volumes", []).append({"name": "lesion-ray-job", "configMap": {"name": f"{name}-spec"}})
    for container in head["containers"]:
        container.setdefault("volumeMounts", []).append({"name": "lesion-ray-job", "mountPath": SPEC_MOUNT})
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": {
            "entrypoint": f"python -m lesion_ray.cli run {SPEC_MOUNT}/job.yaml --cluster {SPEC_MOUNT}/cluster.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,
            "rayClusterSpec": cluster_spec,
        },
    }
    return [config_map, ray_job]
