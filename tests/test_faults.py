"""Every stage rides out a failing S3: the main job runs on S3 through a real HTTP proxy that answers a
share of all requests (4 %, spread evenly) with 500 InternalError or 503 ServiceUnavailable. It runs with
``--verbose``, so its console also shows what a user who asks for Ray's lines sees."""

from __future__ import annotations

import re

import yaml
from test_quickstart import RAY_LINE, REPO, start_cli

from lesion_ray import manifest, storage


def test_the_main_job_on_s3_rides_out_failing_requests(s3_bucket, faulty_s3, tmp_path) -> None:
    proxy = faulty_s3(failure_rate=0.04)  # one request in 25: 11 of the job's ~277; 8 % took 13 s longer
    root = f"{s3_bucket}/quickstart"
    job = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    job["storage"] = {"endpoint_url": proxy.url}  # every request of every stage goes through the proxy
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(job))
    cluster = tmp_path / "cluster.yaml"  # the registry on S3 too
    cluster.write_text(yaml.safe_dump({"kind": "local", "name": "faults", "num_cpus": 4,
                                       "object_store_memory": "256MB", "registry": f"{root}/registry"}))
    run = start_cli(tmp_path, str(tmp_path / "quickstart.yaml"), "--cluster", str(cluster), "--verbose",
                    "steps.synth.num_images=20", "steps.synth.validation_images=4", "steps.synth.width=[64, 96]",
                    "steps.train.epochs=1", "steps.train.num_workers=1", "steps.train.mlflow.enabled=false",
                    f"steps.synth.output={root}/data", f"steps.train.output={root}/train",
                    f"steps.predict.output={root}/predictions", f"steps.evaluate.output={root}/evaluation")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-4000:]
    methods = {method for method, _ in proxy.forwarded}
    assert len(proxy.faulted) >= 8 and {"GET", "PUT", "HEAD"} <= methods, (proxy.faulted, methods)

    assert storage.exists(f"{root}/registry/quickstart-unet/latest.json")
    rows = manifest.read(f"{root}/predictions").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert storage.exists(f"{root}/evaluation/report.html") and "threshold_jaccard" in storage.read_text(
        f"{root}/evaluation/report.json")

    # --verbose: Ray's own lines reach the console too, and the log file still has each of them once.
    assert [line for line in output.splitlines() if RAY_LINE.search(line)], output[-4000:]
    dataset_started = re.compile(r"Starting execution of Dataset (\S+)\.")
    started = dataset_started.findall((tmp_path / "runs" / "quickstart" / "lesion-ray.log").read_text())
    shown = set(dataset_started.findall(output))
    assert started and len(started) == len(set(started)), started
    assert shown and shown <= set(started), (shown, started)
