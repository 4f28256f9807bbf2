"""The cluster configs users take to bigger clusters: `ray up` and KubeRay."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lesion_ray import cli, spec


def test_aws_launcher_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path("cluster/aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    types = config["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("constraints.txt" in command for command in config["setup_commands"])
    assert config["idle_timeout_minutes"] > 0


def test_raycluster_manifest_autoscales_gpu_workers() -> None:
    manifest = yaml.safe_load(Path("cluster/kuberay/raycluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["spec"]["enableInTreeAutoscaling"] is True
    gpu = next(g for g in manifest["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def _render(capsys, tmp_path, job: str, *overrides: str) -> list[dict]:
    # The shipped config, with a registry this test can reach (a local one is not checked).
    config = yaml.safe_load(Path("cluster/kuberay.yaml").read_text())
    config.update(raycluster=os.path.abspath("cluster/kuberay/raycluster.yaml"), registry=str(tmp_path / "reg"))
    (tmp_path / "kuberay.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["render", job, "--cluster", str(tmp_path / "kuberay.yaml"), *overrides]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def test_rayjob_carries_the_spec_unchanged(capsys, tmp_path) -> None:
    docs = _render(capsys, tmp_path, "jobs/train.yaml", "epochs=7")
    config_map, ray_job = docs
    assert config_map["kind"] == "ConfigMap" and ray_job["kind"] == "RayJob"
    assert ray_job["apiVersion"] == "ray.io/v1"
    expected = spec.to_dict(spec.load("jobs/train.yaml", ["epochs=7"]))
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
    assert app["args"] == spec.to_dict(spec.load("jobs/serve.yaml"))
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


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
