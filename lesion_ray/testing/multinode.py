"""Every job kind on a real multi-node Ray cluster, on this one machine.

    python3 scripts/dev.py python -m lesion_ray.testing.multinode          # about 5 minutes on 2 cores
    python3 scripts/dev.py python -m lesion_ray.testing.multinode --keep   # then leave the cluster up (Ctrl-C stops it)

It starts a `ray start` head (no CPUs: it only coordinates, as on a real cluster) and two 4-CPU
workers on loopback with token authentication, writes `runs/multinode/remote.yaml` (cluster/remote.yaml
pointed at this head) and submits every job through it, as `lesion-ray run JOB --cluster ...` would:

1. the quickstart pipeline as one submitted job;
2. batch inference from S3 (or a folder) with one inference actor per worker, every input accounted for;
3. elastic training that starts on the two workers, grows when a third node joins and carries on
   when that node is killed;
4. the serve job behind the cluster's HTTP proxy, answering again after one replica's node is killed.

`tests/test_multinode.py` runs these same scenarios and checks what they report.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lesion_ray import cli, cluster, manifest, report, storage
from lesion_ray.testing import wait_for
from lesion_ray.testing.loopback import LoopbackCluster, free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose jobs/ and cluster/ the scenarios submit
# Tokens live in files readable by this user only, in the cluster's folder (every node is on this
# machine): never in a cluster config, a job's env_vars (shown on the dashboard) or the output.
RAY_TOKEN_FILE = "ray_token"  # the cluster's Ray token, for the Jobs API client (remote.yaml's auth_token_file)
SERVE_TOKEN_FILE = "serve_token"  # the demo API's bearer token (the serve spec's auth_token_file)
# remote.yaml's auth_token_env: a name nobody sets, so that a $RAY_AUTH_TOKEN meant for another cluster
# does not win over the token file.
TOKEN_ENV = "LESION_RAY_MULTINODE_TOKEN"
DEMO_ENV = {
    # Elastic Train waits up to 60 s (Ray's default) for a group of the old size before it shrinks
    # after a node loss; a shorter wait keeps the demo short.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
    # Ray Data starts streaming when the first inference actor is up; in a job this short the other
    # actor could start after the work is done. Waiting for both shows the spread.
    "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
}
COPIES = 5  # each quickstart validation image this many times in the multi-node predict archive
PREDICTOR_ACTORS = "MapWorker(MapBatches(Predictor))"  # the class name Ray Data gives predict's inference actors


def start_cluster() -> LoopbackCluster:
    """A head without CPUs and two 4-CPU workers, all up."""
    nodes = LoopbackCluster(head_cpus=0)
    try:
        for index in (1, 2):
            nodes.add_worker(f"worker{index}", num_cpus=4, resources={"trainer": 1})
        nodes.wait_for_nodes()
    except BaseException:  # no head left running behind a failed start (wait_for_nodes keeps the logs)
        nodes.shutdown()
        raise
    return nodes


def write_secret(folder: str, name: str, value: str) -> Path:
    """``value`` in ``folder/name``, a new file readable by this user only."""
    path = Path(folder) / name
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(value)
    return path


def write_cluster_config(nodes: LoopbackCluster, folder: Path) -> str:
    """cluster/remote.yaml with this cluster's address; it names the token's file, not the token."""
    token_file = write_secret(nodes.root, RAY_TOKEN_FILE, nodes.token)
    config = yaml.safe_load((ROOT / "cluster" / "remote.yaml").read_text())
    config.update(nodes.remote_config(auth_token_env=TOKEN_ENV, auth_token_file=str(token_file),
                                      registry=str(folder / "registry"), env_vars=DEMO_ENV))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "remote.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def quickstart(remote: str, out: Path) -> int:
    """The main job, small, as one submitted job; its exit status."""
    return cli.main([
        "run", str(ROOT / "jobs" / "quickstart.yaml"), "--cluster", remote, "steps.synth.num_images=16",
        "steps.synth.validation_images=4", "steps.synth.width=[96, 128]", "steps.train.epochs=1",
        f"steps.synth.output={out}/data", f"steps.train.output={out}/train",
        f"steps.predict.output={out}/predictions", f"steps.evaluate.output={out}/evaluation",
    ])


def predict_across_nodes(nodes: LoopbackCluster, remote: str, images: list[Path], archive: str,
                         output: str) -> dict[str, Any]:
    """Copy ``images`` (:data:`COPIES` times, so that both actors can get work) and one broken file into ``archive``,
    predict them with one actor per worker, and report the manifest's counts, the nodes its rows were made on and
    the nodes the job's inference actors ran on."""
    before = nodes.actors(PREDICTOR_ACTORS, alive=False)
    nodes.wait_for_nodes(timeout_s=30)  # all there: a node lost earlier would be reported here, with its logs
    ids = [f"ISIC_{9000000 + i:07d}" for i in range(COPIES * len(images))]
    for image_id, image in zip(ids, images * COPIES, strict=True):
        storage.write_bytes(f"{archive}/{image_id}.jpg", image.read_bytes())
    storage.write_bytes(f"{archive}/ISIC_0099999.jpg", b"not a JPEG")  # must become an error row
    status = cli.main(["run", str(ROOT / "jobs" / "predict.yaml"), "--cluster", remote, f"input={archive}",
                       f"output={output}", "min_actors=2", "max_actors=2", "batch_size=2", "overlays=none"])
    rows = manifest.read(output).to_pylist()
    names = {node_id: name for name, node_id in nodes.alive_nodes().items()}
    return {
        "status": status,
        "inputs": sorted([*ids, "ISIC_0099999"]),
        "rows": sorted(r["id"] for r in rows),
        "ok": sorted(r["id"] for r in rows if r["status"] == "ok"),
        "errors": sorted(r["id"] for r in rows if r["status"] == "error"),
        "nodes": sorted({names.get(r["node"], r["node"]) for r in rows}),
        "actor_nodes": sorted(node for actor, node in nodes.actors(PREDICTOR_ACTORS, alive=False).items()
                              if actor not in before),
        "masks": len(storage.list_files(f"{output}/masks")),
    }


def refresh_elastic_view(nodes: LoopbackCluster) -> None:
    """Make Ray re-read the node list now, as it otherwise does every 20 s.

    Elastic Train sizes its group from Ray Data's AutoscalingCoordinator, which re-reads the node
    list on a 20 s tick. On a real cluster that delay is harmless; here it only makes the demo slow.
    """
    code = ("import ray; ray.init(address={address!r}); "
            "c = ray.get_actor('AutoscalingCoordinator', namespace='AutoscalingCoordinator'); "
            "ray.get(c.get_reserved_resources.remote('lesion-ray-multinode', recompute=True))")
    subprocess.run([sys.executable, "-c", code.format(address=nodes.gcs_address)], env=nodes.env(), check=True,
                   capture_output=True, timeout=120)


def _resumed_and_continued(logs: str, workers: int) -> bool:
    """An epoch finished after the last resume with ``workers`` workers, continuing its count."""
    resumes = list(re.finditer(rf"resumed after epoch (\d+) with {workers} workers", logs))
    return bool(resumes) and f"epoch {int(resumes[-1].group(1)) + 1}/" in logs[resumes[-1].end():]


def elastic_training(nodes: LoopbackCluster, remote: str, data: str, output: str) -> dict[str, Any]:
    """Train with num_workers [1, 3] on the trainer nodes; add a third, then kill it. Reports the
    group sizes seen in order and the epochs that finished, in the order they did."""
    job, config, settings = cli.prepare(str(ROOT / "jobs" / "train.yaml"), remote, [
        f"data={data}", f"output={output}", "model_name=elastic-unet", "model.input_size=32",
        "model.num_filters=4", "model.depth=2", "epochs=1000", "batch_size=4", "num_workers=[1, 3]",
        "cpus_per_worker=0", "resources_per_worker={trainer: 1}", "elastic_resize_interval_s=1",
        "tensorboard=false", "mlflow.enabled=false"])  # the demo is about the group's size, not its tracking
    nodes.wait_for_nodes(timeout_s=30)
    client, job_id = cluster.start_job(job, config, settings)

    def logs() -> str:
        return client.get_job_logs(job_id)

    try:
        report.info("elastic: waiting for the first epoch on the nodes present")
        wait_for("the first epoch", lambda: "images/s on 2 workers" in logs())
        report.info("elastic: a third trainer node joins")
        nodes.add_worker("joiner", num_cpus=1, resources={"trainer": 1})
        nodes.wait_for_nodes()
        refresh_elastic_view(nodes)
        wait_for("growth to 3 workers", lambda: "images/s on 3 workers" in logs())
        report.info("elastic: the third node is killed")
        nodes.stop_node("joiner")
        nodes.wait_for_nodes()
        refresh_elastic_view(nodes)
        wait_for("an epoch on 2 workers after the loss", lambda: _resumed_and_continued(logs(), 2))
    finally:
        cluster.stop_job(config, job_id)  # 1,000 epochs: it would go on
    text = logs()
    sizes = [int(n) for n in re.findall(r"images/s on (\d+) workers", text)]
    return {
        "sizes": [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]],
        "epochs": [int(e) for e in re.findall(r"epoch (\d+)/1000: ", text)],
    }


def serve_through_node_loss(nodes: LoopbackCluster, remote: str, image: bytes) -> dict[str, Any]:
    """The serve job with two replicas per deployment; kill a worker that holds a model replica."""
    import httpx

    port = free_port()
    token = secrets.token_hex(16)
    token_file = write_secret(nodes.root, SERVE_TOKEN_FILE, token)
    # HeadOnly: the nodes share one machine, so only one of them can bind the port.
    job, config, settings = cli.prepare(str(ROOT / "jobs" / "serve.yaml"), remote, [
        "min_replicas=2", "max_replicas=2", f"port={port}", "proxy_location=HeadOnly", "poll_latest_s=0",
        "auth_token_env=null", f"auth_token_file={token_file}"])
    nodes.wait_for_nodes(timeout_s=30)
    _, job_id = cluster.start_job(job, config, settings)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}

    def segment() -> bool:
        try:
            response = httpx.post(f"{url}/v1/segment", content=image, headers=headers, timeout=30)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.content.startswith(b"\x89PNG")

    try:
        report.info(f"serve: waiting for {url}")
        wait_for("the API to answer", segment)
        replicas = wait_for("two model replicas", lambda: len(
            found := nodes.actor_nodes("ServeReplica:lesion:SegmentationModel")) == 2 and found, 60)
        victim = next(name for name in replicas if name != "head")
        report.info(f"serve: model replicas on {', '.join(replicas)}; killing {victim}")
        nodes.stop_node(victim)
        # Requests in flight on the killed node may fail; then every request is answered again.
        stopped = time.monotonic()
        wait_for("requests to succeed again", lambda: all(segment() for _ in range(10)), 120)
        recovered_s = time.monotonic() - stopped
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    finally:
        cluster.stop_job(config, job_id)
    return {"replica_nodes": replicas, "killed": victim, "recovered_s": round(recovered_s, 1), "health": health}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "multinode"), help="outputs and the cluster config")
    parser.add_argument("--keep", action="store_true", help="keep the cluster up afterwards, until Ctrl-C")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    started = time.monotonic()
    report.info("starting a head and two workers on loopback")
    with start_cluster() as nodes:
        remote = write_cluster_config(nodes, out)
        report.info(f"cluster up: {nodes.dashboard_url}; config {remote}")
        results: dict[str, Any] = {"quickstart": "ok" if quickstart(remote, out / "quickstart") == 0 else "failed"}
        images = sorted((out / "quickstart" / "data" / "ISIC2018_Task1-2_Validation_Input").glob("*.jpg"))
        predicted = predict_across_nodes(nodes, remote, images, str(out / "archive"), str(out / "predict"))
        results["predict"] = (f"{len(predicted['ok'])} ok + {len(predicted['errors'])} failed = "
                              f"{len(predicted['rows'])} of {len(predicted['inputs'])} inputs, "
                              f"actors on {', '.join(predicted['actor_nodes'])}, rows made on "
                              f"{', '.join(predicted['nodes'])}")
        elastic = elastic_training(nodes, remote, str(out / "quickstart" / "data"), str(out / "elastic"))
        results["elastic"] = (f"group sizes {' -> '.join(map(str, elastic['sizes']))}, "
                              f"epochs 1-{max(elastic['epochs'])}")
        served = serve_through_node_loss(nodes, remote, images[0].read_bytes())
        results["serve"] = (f"replicas on {', '.join(served['replica_nodes'])}; killed {served['killed']}; "
                            f"answering again after {served['recovered_s']} s")
        print(report.format_summary(f"multinode demo finished in {time.monotonic() - started:.0f}s", results))
        if args.keep:
            report.info(f"the cluster stays up: lesion-ray run JOB --cluster {remote} (its token is in "
                        f"{Path(nodes.root) / RAY_TOKEN_FILE}, readable by you only); Ctrl-C stops it")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if results["quickstart"] == "ok" and predicted["status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
