"""The cluster configs users take to bigger clusters: `ray up` and KubeRay."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from lesion_ray import cli, kuberay, spec


def test_aws_launcher_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path("cluster/aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    types = config["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("constraints.txt" in command for command in config["setup_commands"])
    assert config["idle_timeout_minutes"] > 0


def test_aws_every_node_type_starts_with_token_auth_and_the_heads_token() -> None:
    # tests/test_cluster_auth.py starts a head and a worker with these commands for real.
    config = yaml.safe_load(Path("cluster/aws.yaml").read_text())
    for node_type in config["available_node_types"]:
        head = node_type == config["head_node_type"]
        commands = config["head_start_ray_commands" if head else "worker_start_ray_commands"]
        starts = [command for command in commands if "ray start" in command]
        assert starts and all(re.search(r"\bRAY_AUTH_MODE=token ray start\b", c) for c in starts), node_type
    head_commands = config["head_start_ray_commands"]
    generate = next(i for i, c in enumerate(head_commands) if "ray get-auth-token --generate" in c)
    assert generate < next(i for i, c in enumerate(head_commands) if "ray start --head" in c)
    assert config["cluster_synced_files"] == ["~/.ray/auth_token"]  # to each worker, before it starts


def test_raycluster_manifest_autoscales_gpu_workers() -> None:
    manifest = yaml.safe_load(Path("cluster/kuberay/raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["spec"]["enableInTreeAutoscaling"] is True
    gpu = next(g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def _render(capsys, tmp_path, job: str, *overrides: str, **cluster: str) -> list[dict]:
    # The shipped config, with a registry this test can reach (a local one is not checked).
    config = yaml.safe_load(Path("cluster/kuberay.yaml").read_text())
    config.update(raycluster=os.path.abspath("cluster/kuberay/raycluster.yaml"), registry=str(tmp_path / "reg"),
                  **cluster)
    (tmp_path / "kuberay.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["render", job, "--cluster", str(tmp_path / "kuberay.yaml"), *overrides]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def test_rayjob_carries_the_spec_unchanged(capsys, tmp_path) -> None:
    docs = _render(capsys, tmp_path, "jobs/train.yaml", "epochs=7")
    config_map, ray_job = docs
    assert config_map["kind"] == "ConfigMap" and ray_job["kind"] == "RayJob"
    assert ray_job["apiVersion"] == "ray.io/v1"
    expected = spec.load("jobs/train.yaml", ["epochs=7"]).model_dump(mode="json")
    assert yaml.safe_load(config_map["data"]["job.yaml"]) == expected
    job_spec = ray_job["spec"]
    assert "lesion_ray.cli run" in job_spec["entrypoint"] and job_spec["shutdownAfterJobFinishes"] is True
    head = job_spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][-1]["configMap"]["name"] == config_map["metadata"]["name"]
    assert all(c["image"] == "lesion-ray:0.1.0" for c in head["containers"])
    inside = yaml.safe_load(config_map["data"]["cluster.yaml"])
    assert inside["address"] == "auto" and inside["registry"] == str(tmp_path / "reg")


def test_rayservice_carries_the_serve_config(capsys, tmp_path) -> None:
    (service,) = _render(capsys, tmp_path, "jobs/serve.yaml")
    assert service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve_config["applications"][0]
    assert app["import_path"] == "lesion_ray.serve:app_builder"
    # The spec, but with the bearer token from the mounted Secret, listening where the pod's Service reaches it,
    # and the cluster config's registry (the Serve config is all the application gets).
    expected = spec.load("jobs/serve.yaml", ["auth_token_env=null", "host=0.0.0.0",
                                             f"auth_token_file={kuberay.SERVE_TOKEN_MOUNT}/token",
                                             f"registry={tmp_path / 'reg'}"]).model_dump(mode="json")
    assert app["args"] == expected
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_rendered_manifests_authenticate_through_secrets_and_hold_no_token(capsys, tmp_path, monkeypatch) -> None:
    # Tokens everywhere a careless renderer could pick one up: Ray's variables, the serve spec's variable
    # (jobs/serve.yaml: auth_token_env: LESION_RAY_TOKEN) and Ray's default token file.
    tokens = {"RAY_AUTH_TOKEN": "ray-token-4f1c9e", "LESION_RAY_TOKEN": "serve-token-7b2d5a"}
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("file-token-9e3a1b")
    ray_job = _render(capsys, tmp_path, "jobs/train.yaml")[1]
    (service,) = _render(capsys, tmp_path, "jobs/serve.yaml")
    for text in (yaml.safe_dump_all([ray_job, service]), service["spec"]["serveConfigV2"]):
        assert not any(token in text for token in [*tokens.values(), "file-token-9e3a1b"])

    token_ref = {"secretKeyRef": {"name": "lesion-ray-auth", "key": "auth_token"}}
    for cluster_spec in (ray_job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        # KubeRay's operator passes this Secret's token to the RayJob submitter and its own dashboard calls.
        assert cluster_spec["authOptions"] == {"mode": "token", "secretName": "lesion-ray-auth"}
        for container in _containers(cluster_spec):
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == token_ref, container["name"]

    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["auth_token_env"] is None
    assert args["auth_token_file"] == f"{kuberay.SERVE_TOKEN_MOUNT}/token"
    cluster_spec = service["spec"]["rayClusterConfig"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for pod in (group["template"]["spec"] for group in groups):  # the HTTP ingress may run on any node
        volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "lesion-ray-serve-token")
        assert all({"name": volume["name"], "mountPath": kuberay.SERVE_TOKEN_MOUNT, "readOnly": True}
                   in c["volumeMounts"] for c in pod["containers"])


def test_secret_names_come_from_the_kuberay_config(capsys, tmp_path) -> None:
    (service,) = _render(capsys, tmp_path, "jobs/serve.yaml", auth_secret="team-ray", serve_token_secret="team-serve")
    cluster_spec = service["spec"]["rayClusterConfig"]
    assert cluster_spec["authOptions"]["secretName"] == "team-ray"
    assert {e["valueFrom"]["secretKeyRef"]["name"] for c in _containers(cluster_spec) for e in c["env"]
            if e["name"] == "RAY_AUTH_TOKEN"} == {"team-ray"}
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    assert {"name": "serve-token", "secret": {"secretName": "team-serve"}} in head["volumes"]


def test_run_on_kuberay_points_at_render(capsys) -> None:
    assert cli.main(["run", "jobs/train.yaml", "--cluster", "cluster/kuberay.yaml"]) == 2
    assert "lesion-ray render jobs/train.yaml" in capsys.readouterr().err


def test_serve_config_export(capsys) -> None:
    assert cli.main(["serve-config", "jobs/serve.yaml", "port=9000"]) == 0
    exported = yaml.safe_load(capsys.readouterr().out)
    assert exported["http_options"]["port"] == 9000
    assert exported["applications"][0]["args"]["port"] == 9000
    assert cli.main(["serve-config", "jobs/train.yaml"]) == 2
    assert "needs a serve spec" in capsys.readouterr().err
