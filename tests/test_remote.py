"""Remote submission through the Ray Jobs API, against a real `ray start --head` with token auth."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lesion_ray import cli, cluster, storage


def cluster_file(tmp_path, processes, **overrides) -> str:
    config = processes.remote_config(**{"name": "test-remote", "auth_token_env": "LR_TEST_TOKEN",
                                        "dependencies": "pinned", "registry": str(tmp_path / "registry"),
                                        **overrides})
    path = tmp_path / f"remote-{len(overrides)}-{abs(hash(str(overrides)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _client(cluster_yaml: str, home, **env: str) -> subprocess.CompletedProcess:
    """`lesion-ray jobs list` as a fresh client machine runs it: no Ray token anywhere but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "LR_TEST_TOKEN"}
    return subprocess.run([sys.executable, "-m", "lesion_ray.cli", "jobs", "list", "--cluster", cluster_yaml],
                          env={**clean, "HOME": str(home), **env}, capture_output=True, text=True, timeout=120)


def test_client_without_token_is_told_how_to_supply_it(tmp_path, ray_processes) -> None:
    config = cluster_file(tmp_path, ray_processes)
    refused = _client(config, tmp_path)
    assert refused.returncode == 1
    assert "requires a token" in refused.stderr and "$LR_TEST_TOKEN" in refused.stderr
    assert "ray get-auth-token" in refused.stderr and "Traceback" not in refused.stderr

    wrong = _client(config, tmp_path, LR_TEST_TOKEN="not-the-token")
    assert wrong.returncode == 1
    assert "rejected the token from $LR_TEST_TOKEN" in wrong.stderr
    assert "not-the-token" not in wrong.stderr

    right = _client(config, tmp_path, LR_TEST_TOKEN=ray_processes.token)
    assert right.returncode == 0, right.stderr
    assert f"job(s) on {ray_processes.dashboard_url}" in right.stdout


def test_submitted_job_succeeds_and_logs_come_back(tmp_path, ray_processes, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LR_TEST_TOKEN", ray_processes.token)
    remote = cluster_file(tmp_path, ray_processes)
    output = tmp_path / "synth-out"
    status = cli.main(["run", "jobs/synth.yaml", "--cluster", remote, f"output={output}",
                       "num_images=3", "validation_images=1", "name=remote-synth"])
    out = capsys.readouterr()
    assert status == 0, out.err[-3000:]
    assert "finished in" in out.out  # the job's own summary, streamed back from the cluster
    assert "SUCCEEDED" in out.err
    assert len(storage.list_files(str(output), suffixes=(".jpg",))) == 4

    assert cli.main(["jobs", "list", "--cluster", remote]) == 0
    listing = capsys.readouterr().out
    job_line = next(line for line in listing.splitlines() if "remote-synth" in line)
    job_id = job_line.split()[0]
    assert "SUCCEEDED" in job_line and "synth" in job_line
    assert cli.main(["jobs", "logs", job_id, "--cluster", remote]) == 0
    assert "finished in" in capsys.readouterr().out
    assert cli.main(["jobs", "stop", job_id, "--cluster", remote]) == 0
    assert "already finished" in capsys.readouterr().out


def test_failed_job_gives_failed_status(tmp_path, ray_processes, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LR_TEST_TOKEN", ray_processes.token)
    remote = cluster_file(tmp_path, ray_processes, dependencies="installed")
    # Valid for the client (local paths are the cluster's business), impossible on the cluster.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    status = cli.main(["run", "jobs/synth.yaml", "--cluster", remote, f"output={blocker}/sub",
                       "num_images=1", "validation_images=0"])
    out = capsys.readouterr()
    assert status == 1
    assert "FAILED" in out.err
    assert "cannot write" in out.out + out.err


def test_pinned_requirements_follow_this_client() -> None:
    pins = cluster.pinned_requirements()
    names = {p.split("==")[0].lower() for p in pins}
    assert {"torch", "pyarrow", "numpy", "pillow", "boto3", "pyyaml"} <= names
    assert "ray" not in names  # the cluster's own Ray stays
    assert all("==" in p and "+" not in p for p in pins)


def test_the_local_config_attaches_with_address_auto_added(tmp_path) -> None:
    # As the README says: cluster/local.yaml (its sizes at their defaults) plus `address: auto`.
    with open("cluster/local.yaml") as f:
        config = yaml.safe_load(f) | {"address": "auto"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cluster.load_cluster(str(tmp_path / "c.yaml")).address == "auto"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config | {"object_store_memory": None}))  # null sizes nothing
    assert cluster.load_cluster(str(tmp_path / "c.yaml")).object_store_memory is None


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({"kind": "remote"}, "address: a remote cluster needs the Ray Jobs API URL"),
        ({"kind": "remote", "address": "head:8265"}, "expected an http(s):// URL"),
        # The token where its variable's name goes: refused without repeating it.
        ({"kind": "remote", "address": "http://127.0.0.1:1", "auth_token_env": "tok83451290"},
         "auth_token_env: must be the NAME of an environment variable holding the token"),
        ({"kind": "remote", "address": "http://127.0.0.1:1", "auth_token_env": 83451290},  # YAML reads an int
         "auth_token_env: must be the NAME of an environment variable holding the token"),
        ({"kind": "local", "object_store_memory": "lots"}, "expected a size like 2GB"),
        ({"kind": "local", "num_cpus": 0}, "num_cpus: must be at least 1"),
        ({"kind": "local", "address": "auto", "num_cpus": 4},
         "num_cpus: sizes the embedded Ray only; with address the running Ray's own resources apply"),
        ({"kind": "local", "address": "auto", "object_store_memory": "2GB"}, "object_store_memory: sizes the embedded"),
        ({"kind": "cloud"}, "kind: expected one of 'local', 'remote'"),
        ({"kind": "remote", "address": "http://127.0.0.1:1", "env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}},
         "env_vars.AWS_SECRET_ACCESS_KEY: looks like a secret"),
        ({"kind": "kuberay", "raycluster": "r.yaml", "env_vars": {"DB_PASSWORD": "s3cr3t"}},
         "env_vars.DB_PASSWORD: looks like a secret"),
        # Refused before the types are checked: "expected a string, got 83451290" would print it.
        ({"kind": "remote", "address": "http://127.0.0.1:1", "env_vars": {"DB_PASSWORD": 83451290}},
         "env_vars.DB_PASSWORD: looks like a secret"),
        ({"kind": "local", "env_vars": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}},
         "env_vars.AWS_ENDPOINT_URL: is a storage setting: write it as storage.endpoint_url"),
        ({"kind": "kuberay", "raycluster": "r.yaml", "env_vars": {"RAY_AUTH_MODE": "disabled"}},
         "env_vars.RAY_AUTH_MODE: would change Ray's authentication"),
    ],
)
def test_bad_cluster_configs(tmp_path, config, text, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", "jobs/synth.yaml", "--cluster", str(path)]) == 2
    err = capsys.readouterr().err
    assert text in err and "83451290" not in err


@pytest.mark.parametrize("name", ["LESION_RAY_TOKEN", "AWS_SESSION_TOKEN", "HF_API_KEY"])
def test_remote_job_refuses_secrets_in_env_vars(tmp_path, name, capsys) -> None:
    # Nothing listens at this address: exit 2 (not "cannot reach", 1) shows nothing was sent.
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump({"kind": "remote", "address": "http://127.0.0.1:1",
                                    "env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30", name: "s3cr3t"}}))
    assert cli.main(["run", "jobs/synth.yaml", "--cluster", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"env_vars.{name}: looks like a secret" in err and "auth_token_file" in err and "Kubernetes Secret" in err
    assert "s3cr3t" not in err


def test_object_store_sizes() -> None:
    assert cluster.parse_size("2GB") == 2 * 1024**3
    assert cluster.parse_size("512MiB") == 512 * 1024**2
    assert cluster.parse_size(1000) == 1000
