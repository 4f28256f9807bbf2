"""Archive scale: ``kind: predict``'s driver from 10 k to 10 M inputs, and a real 100 k-object S3 run.

    python benchmarks/bench_scale.py          # simulated 10 k and 1 M; discovery-only 10 k and 10 M; S3 100 k
    python benchmarks/bench_scale.py --simulated 10000 --discovery-only 10000 --s3-objects 5000   # a quick look

Every part runs ``predict.run`` itself (listing, triage, the ledger, the queue into Ray Data, decode,
inference, writing, manifest parts, the final manifest) with a model cheap enough (4 filters, 32x32)
that the bookkeeping dominates:

1. **Simulated listing** (``--simulated N ...``), SIMULATED: the input listing is replaced by a
   generator of N keys ``ISIC_<i>.jpg`` in pages of 1,000, as fast as the driver takes them; no storage
   is listed. The first ``--real`` keys are real JPEG files in a local folder, so masks are made; the
   others do not exist, so each becomes an error row ("no such file") after a real read attempt in the
   pipeline.
2. **Discovery only** (``--discovery-only N ...``), SIMULATED: the same with ``.tif`` keys, which
   discovery refuses (an unsupported type): every key goes through the driver's bookkeeping (triage,
   the ledger, a manifest part, the final manifest) but not through the pipeline, whose rate on this
   2-core machine (a few thousand rows/s) would make 10 M rows take hours.
3. **A real S3 archive** (``--s3-objects N``): a moto server with N small objects: images, a second
   image for some ids, .tif files, images over ``max_bytes``, licences. It checks that
   ok + error + skipped = listed = objects written, with the counts of each kind. Its first mask measures
   moto more than the driver: moto sorts the whole bucket for every list request (0.7-0.8 s a page at 100 k
   objects) in one process, and while the listing runs each read waits its turn there (seconds, not ms).

Reported for each: time to the first mask, the whole job, objects/s, and the driver process's peak
memory (PSS, sampled every 0.2 s; Ray's own processes are the cluster's, not the driver's).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone

import boto3
import numpy as np
import pyarrow.compute as pc
import ray
from common import PeakMemory, pss_bytes, publish_model, start_s3  # benchmarks/common.py (the script folder)
from PIL import Image

from lesion_ray import cluster, manifest, predict, storage
from lesion_ray.models import ModelConfig
from lesion_ray.settings import Settings
from lesion_ray.spec import from_dict

BUCKET = "scale"
MODEL = ModelConfig(task=1, input_size=32, num_filters=4, depth=2)
PAGE = 1000


def tiny_jpeg(seed: int, size: int = 24) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="JPEG", quality=80)
    return out.getvalue()


def simulated_listing(folder: str, keys: int, suffix: str) -> Iterator[list[storage.FileInfo]]:
    for start in range(0, keys, PAGE):
        yield [storage.FileInfo(f"{folder}/ISIC_{i:07d}{suffix}", 1000) for i in range(start, min(start + PAGE, keys))]


def run_predict(spec_keys: dict, settings: Settings, batch_size: int) -> tuple[dict, float, float, int]:
    """(summary, seconds, seconds to the first mask, driver peak PSS) of one predict run."""
    spec = from_dict(predict.PredictSpec, {"kind": "predict", "name": "scale", "overlays": "none",
                                           "resume": False, "batch_size": batch_size, **spec_keys}, "bench")
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    with PeakMemory(children=False) as memory:  # the driver alone: Ray's processes are the cluster's
        summary = predict.run(spec, settings)
    seconds = time.perf_counter() - start
    first = min((pc.min(batch.filter(pc.equal(batch["status"], "ok"))["finished_at"]).as_py()
                 for batch in manifest.iter_batches(summary["manifest"], ["status", "finished_at"])
                 if batch["status"].to_pylist().count("ok")), default=None)
    return summary, seconds, (first - started).total_seconds() if first else float("nan"), memory.peak


def simulated(sizes: list[int], real: int, settings: Settings, work: str, ref: str, registry: str,
              batch_size: int, suffix: str = ".jpg") -> list[str]:
    """Predict over simulated listings of ``sizes`` keys: ``.jpg`` keys go through the pipeline, ``.tif``
    keys (an unsupported type) are refused at discovery, so only the driver's bookkeeping runs for them."""
    folder = os.path.join(work, "sim-input")
    os.makedirs(folder, exist_ok=True)
    for i in range(real):
        with open(os.path.join(folder, f"ISIC_{i:07d}.jpg"), "wb") as f:
            f.write(tiny_jpeg(i))
    real_listing = storage.iter_listing_parallel
    rows = []
    for keys in sizes:
        # SIMULATED: the listing of this one folder is replaced; everything after it is the real code.
        storage.iter_listing_parallel = lambda uri, *a, keys=keys: (  # noqa: E731
            simulated_listing(folder, keys, suffix) if uri == folder else real_listing(uri, *a))
        out = os.path.join(work, f"sim-out-{keys}")
        try:
            summary, seconds, first, peak = run_predict(
                {"input": folder, "model": ref, "registry": registry, "output": out}, settings, batch_size)
        finally:
            storage.iter_listing_parallel = real_listing
        assert summary["listed"] == keys == summary["ok"] + summary["error"], summary  # every key accounted for
        what = "simulated" if suffix == ".jpg" else "simulated, all refused at discovery"
        rows.append(f"| {what} | {keys:,} | {summary['ok']:,} | {summary['error']:,} | {first:.1f} s | "
                    f"{seconds:.0f} s | {keys / seconds:,.0f} | {peak / 2**20:,.0f} MiB |")
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def write_objects(endpoint: str, objects: list[tuple[str, bytes]]) -> None:
    """PUT each ``(key, body)`` into the bucket, 32 at a time."""
    client = boto3.client("s3", endpoint_url=endpoint)
    with ThreadPoolExecutor(32) as pool:
        for _ in pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=item[0], Body=item[1]), objects):
            pass  # the responses are not kept


def s3_archive(objects: int, settings: Settings, ref: str, registry: str, batch_size: int) -> list[str]:
    """``objects`` objects: 0.5 % second images of an id, 0.5 % .tif, 0.5 % over max_bytes, 1 % not images."""
    bodies = [tiny_jpeg(seed) for seed in range(16)]
    big = tiny_jpeg(99, size=160)
    expected = {"ok": 0, "error": 0, "skipped": 0}

    def body(i: int) -> tuple[str, bytes, str]:
        kind = i % 200
        if kind == 0 and i:
            return f"in/ISIC_{i - 1:07d}.png", bodies[i % 16], "error"  # a second image with the id before it
        if kind == 2:
            return f"in/ISIC_{i:07d}.tif", b"II*\x00", "error"
        if kind == 3:
            return f"in/ISIC_{i:07d}.jpg", big, "error"
        if kind < 6:
            return f"in/notes/ISIC_{i:07d}.txt", b"licence", "skipped"
        return f"in/ISIC_{i:07d}.jpg", bodies[i % 16], "ok"

    plan = [body(i) for i in range(objects)]
    for _, _, status in plan:
        expected[status] += 1
    start = time.perf_counter()
    # From a process of its own: boto3 PUTs leave their memory with the process that made them (+67 MiB PSS
    # after 20,000 of them, measured), which the driver's peak below would count as the job's.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(write_objects, settings.storage.endpoint_url, [(key, data) for key, data, _ in plan]).result()
    print(f"wrote {objects:,} objects to moto in {time.perf_counter() - start:.0f} s; the driver's PSS before the "
          f"job: {pss_bytes(os.getpid()) / 2**20:,.0f} MiB", flush=True)
    # moto sorts every key of the bucket for each list request; real S3 answers one in tens of milliseconds.
    client = boto3.client("s3", endpoint_url=settings.storage.endpoint_url)
    client.list_objects_v2(Bucket=BUCKET, Prefix="in/", MaxKeys=1)  # the client's first call loads its models
    start = time.perf_counter()
    client.list_objects_v2(Bucket=BUCKET, Prefix="in/", MaxKeys=PAGE)
    print(f"moto answers a {PAGE:,}-key list request in {time.perf_counter() - start:.2f} s at this size", flush=True)
    summary, seconds, first, peak = run_predict(
        {"input": f"s3://{BUCKET}/in", "model": ref, "registry": registry, "output": f"s3://{BUCKET}/out",
         "max_bytes": len(big) - 1}, settings, batch_size)
    counts = {status: summary[status] for status in expected}
    accounted = sum(counts.values()) == summary["listed"] == objects and counts == expected
    print(f"S3 archive: {summary['listed']:,} listed = {counts}; expected {expected}: "
          f"{'every object accounted for' if accounted else 'MISMATCH'}", flush=True)
    return [f"| moto S3 | {objects:,} | {summary['ok']:,} | {summary['error']:,} (+{summary['skipped']:,} skipped) | "
            f"{first:.1f} s | {seconds:.0f} s | {objects / seconds:,.0f} | {peak / 2**20:,.0f} MiB |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulated", type=int, nargs="*", default=[10_000, 1_000_000])
    parser.add_argument("--discovery-only", type=int, nargs="*", default=[10_000, 10_000_000],
                        help="simulated listings of .tif keys: the driver's bookkeeping alone, at sizes whose rows "
                             "this machine could not push through the pipeline in a benchmark's time")
    parser.add_argument("--real", type=int, default=500, help="real images at the start of a simulated listing")
    parser.add_argument("--s3-objects", type=int, default=100_000)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the embedded Ray")
    parser.add_argument("--batch-size", type=int, default=1000, help="predict's batch_size (images per block)")
    args = parser.parse_args()

    server, settings = start_s3(BUCKET)
    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, runtime_env=cluster.runtime_env(settings))
        registry = f"s3://{BUCKET}/registry"
        ref = publish_model(MODEL, registry, os.path.join(work, "model"))
        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; Ray {ray.__version__}; "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
        rows = simulated(args.simulated, args.real, settings, work, ref, registry, args.batch_size) \
            if args.simulated else []
        rows += simulated(args.discovery_only, 0, settings, work, ref, registry, args.batch_size, ".tif") \
            if args.discovery_only else []
        rows += s3_archive(args.s3_objects, settings, ref, registry, args.batch_size) if args.s3_objects else []
        print("\n| listing | objects | ok | error | first mask | whole job | objects/s | driver peak PSS |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        ray.shutdown()
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
