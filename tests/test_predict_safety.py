"""Batch inference never overwrites what it reads, owns its output while it runs, and survives real
faults: an inference actor killed with ray.kill, the driver killed with SIGKILL, S3 failing requests."""

from __future__ import annotations

import io
import os
import signal
import threading

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from test_predict import jpeg, make_spec, publish_tiny_model
from test_quickstart import start_cli

from lesion_ray import cli, feed, manifest, predict, storage
from lesion_ray.testing import wait_for


@pytest.mark.parametrize("input_, output", [
    ("{tmp}/archive", "{tmp}/archive"),
    ("{tmp}/archive", "file://{tmp}/archive/"),
    ("{tmp}/archive", "{tmp}/archive/masks"),
    ("{tmp}/archive/images", "{tmp}/archive"),
    ("s3://bucket/archive", "s3://bucket/archive/predictions"),
    ("s3://bucket/archive/", "s3://bucket/archive"),
])
def test_output_may_not_overlap_the_input(tmp_path, capsys, input_: str, output: str) -> None:
    status = cli.main(["validate", "jobs/predict.yaml", f"input={input_.format(tmp=tmp_path)}",
                       f"output={output.format(tmp=tmp_path)}"])
    assert status == 2
    err = capsys.readouterr().err
    assert "error: jobs/predict.yaml: output:" in err and "is, contains or lies inside the input" in err


def test_output_beside_the_input_is_fine(tmp_path) -> None:
    make_spec(input=str(tmp_path / "archive"), model="m@latest", output=str(tmp_path / "archive-masks"))


def _manifest(out: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/{manifest.MANIFEST_FILE}"))).to_pylist()


def _start_run(spec: predict.PredictSpec, settings) -> tuple[threading.Thread, dict]:
    """``predict.run`` in a thread; the dict gets its summary, or the error it raised."""
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = predict.run(spec, settings)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    return runner, result


def _kill_an_actor(class_name: str) -> None:
    """Kill an alive actor whose class name holds ``class_name``, for good (no restart)."""
    actors = [a for a in ray._private.state.actors().values()
              if class_name in a["ActorClassName"] and a["State"] == "ALIVE"]
    assert actors, f"no {class_name} actor alive mid-run"
    core_worker = ray._private.worker.global_worker.core_worker
    ray.kill(core_worker.get_actor_handle(ray.ActorID.from_hex(actors[0]["ActorID"])))


def test_killed_actor_and_a_second_run_into_the_same_output(ray_local, settings, tmp_path) -> None:
    reg = str(tmp_path / "registry")
    ref = publish_tiny_model(tmp_path, reg, task=1)
    for i in range(120):
        storage.write_bytes(str(tmp_path / "in" / f"ISIC_{i:07d}.jpg"), jpeg(64, 48, i))
    out = str(tmp_path / "out")
    spec = make_spec(input=str(tmp_path / "in"), model=ref, registry=reg, output=out, batch_size=2,
                     min_actors=2, max_actors=2, overlays="none")
    runner, result = _start_run(spec, settings)
    masks = tmp_path / "out" / "masks"
    wait_for("the first masks", lambda: masks.is_dir() and len(os.listdir(masks)) >= 10, 120)

    # A second run into the same output is refused while the first one owns it.
    with pytest.raises(predict.OutputLocked, match=r"in use by predict run by .* \(pid \d+\).*take_over_lock=true"):
        predict.run(spec, settings)

    _kill_an_actor("Predictor")
    runner.join(300)

    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert (summary["inputs"], summary["ok"], summary["error"]) == (120, 120, 0)
    ids = [row["id"] for row in _manifest(out)]
    assert sorted(ids) == [f"ISIC_{i:07d}" for i in range(120)]  # every input exactly once
    assert len(os.listdir(masks)) == 120
    assert not storage.exists(f"{out}/{predict.LOCK_FILE}") and not storage.exists(f"{out}/{manifest.PARTS_DIR}")
    assert predict.run(spec, settings)["resumed"] == 120  # the lock is gone with the run that held it


def test_a_last_failed_attempt_accounts_for_what_the_listing_had_not_reached(ray_local, settings, tmp_path,
                                                                            monkeypatch, capsys) -> None:
    # One attempt, and a listing that runs ten 4-image pages ahead of the finished rows (read tasks of one page, so
    # that none holds back a page the window waits for): when the pass fails, most of the input is not listed yet.
    # Every object must still be in the manifest. It fails as when the node that holds the listing's queue is lost:
    # the queue's actor is killed, and the read tasks waiting on it fail.
    monkeypatch.setattr(predict, "ATTEMPTS", 1)
    monkeypatch.setattr(storage, "_PAGE", 4)
    monkeypatch.setattr(feed, "PAGES_PER_READ", 1)
    monkeypatch.setattr(feed, "LEAD", 40)
    reg = str(tmp_path / "registry")
    ref = publish_tiny_model(tmp_path, reg, task=1)
    ids = [f"ISIC_{i:07d}" for i in range(200)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(str(tmp_path / "in" / f"{image_id}.jpg"), jpeg(32, 24, i))
    out = str(tmp_path / "out")
    runner, result = _start_run(make_spec(input=str(tmp_path / "in"), model=ref, registry=reg, output=out,
                                          batch_size=2, min_actors=1, max_actors=1, overlays="none"), settings)
    masks = tmp_path / "out" / "masks"
    wait_for("the first masks", lambda: masks.is_dir() and len(os.listdir(masks)) >= 4, 120)
    _kill_an_actor("_QueueActor")
    runner.join(300)

    assert not runner.is_alive(), "the run did not end after its listing queue was killed"
    assert "error" not in result, result.get("error")
    assert (result["summary"]["listed"], result["summary"]["inputs"]) == (200, 200)
    rows = {row["id"]: row for row in _manifest(out)}
    assert sorted(rows) == ids
    not_done = [row["error"] for row in rows.values() if row["status"] == "error"]
    # More than the window holds: the pass failed before the listing reached the end.
    reason = "not processed: the pipeline failed: QueueLost: the listing's queue is lost"
    assert len(not_done) > feed.LEAD and all(error.startswith(reason) for error in not_done), not_done[0]
    assert "listing the rest of the input to record the images not done" in capsys.readouterr().err


def test_driver_killed_then_resumed_through_failing_s3(settings, s3_bucket, faulty_s3, tmp_path) -> None:
    reg, inputs, out = f"{s3_bucket}/registry", f"{s3_bucket}/in", f"{s3_bucket}/out"
    ref = publish_tiny_model(tmp_path, reg, task=1)
    ids = [f"ISIC_{i:07d}" for i in range(48)]
    for i, image_id in enumerate(ids):
        storage.write_bytes(f"{inputs}/{image_id}.jpg", jpeg(64, 48, i))
    broken = ids[7]  # every request for this object fails: it must become one error row, not a failed job
    proxy = faulty_s3(failure_rate=0.03, always_fail=(broken,))
    keys = {"input": inputs, "model": ref, "registry": reg, "output": out, "batch_size": 2, "overlays": "none",
            "min_actors": 1, "max_actors": 1}
    job = tmp_path / "predict.yaml"
    job.write_text(yaml.safe_dump({"kind": "predict", "name": "faulty", **keys,
                                   "storage": {"endpoint_url": proxy.url}}))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"kind": "local", "name": "test", "num_cpus": 4,
                                       "object_store_memory": "256MB"}))

    # 4 attempts per request instead of the default 8: the always-failing object gives up after 3 backoffs of up to
    # 1, 2 and 4 s (botocore's) instead of 7 (up to 71 s in all); the proxy's 3 % are one request in 33, so a retried
    # request meets another fault only when 33 other requests passed in between.
    attempts = {"AWS_MAX_ATTEMPTS": "4"}
    first = start_cli(tmp_path, str(job), "--cluster", str(cluster), env=attempts)
    parts = f"{out}/{manifest.PARTS_DIR}"
    wait_for("manifest parts",
             lambda: first.poll() is not None or (storage.exists(parts) and len(storage.list_files(parts)) >= 3), 180)
    assert first.poll() is None, f"the run ended before it could be killed:\n{first.communicate()[0][-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    # Ray's workers outlive their driver by a moment (a task may still finish its part): wait until the
    # killed run's parts stop changing, so that what it finished is known before the next run starts.
    seen: list[int] = []
    wait_for("the killed run's last parts",
             lambda: seen.append(len(storage.list_files(parts))) or seen[-3:] == [seen[-1]] * 3 and len(seen) > 2, 60)

    finished = {row["id"] for row in manifest.read(out).to_pylist() if row["status"] == "ok"}
    assert finished and len(finished) < len(ids) - 1
    assert storage.exists(f"{out}/{predict.LOCK_FILE}")  # left behind by the killed run

    # The crashed run's lock stands until a run is told to take it over.
    with pytest.raises(predict.OutputLocked, match="if that run crashed, run again with take_over_lock=true"):
        predict.run(make_spec(**keys), settings)

    proxy.forwarded.clear()
    proxy.faulted.clear()
    resumed = start_cli(tmp_path, str(job), "--cluster", str(cluster), "take_over_lock=true", env=attempts)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    # The faults were real and the job still went through: the broken object's, and others' that retries rode out.
    assert [path for path in proxy.faulted if broken in path] and [path for path in proxy.faulted if broken not in path]

    rows = {row["id"]: row for row in _manifest(out)}
    assert sorted(rows) == ids  # every input exactly once
    assert rows[broken]["status"] == "error" and "unreadable" in rows[broken]["error"]
    assert all(rows[i]["status"] == "ok" for i in ids if i != broken)
    # Only what was missing is written again: no mask of a finished image went through the proxy.
    written = {path.rsplit("/", 1)[-1].removesuffix("_segmentation.png") for method, path in proxy.forwarded
               if method == "PUT" and "/masks/" in path}
    assert written == set(ids) - finished - {broken}
    assert not storage.exists(f"{out}/{predict.LOCK_FILE}")
