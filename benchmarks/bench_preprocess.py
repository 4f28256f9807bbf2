"""Preprocessing throughput and memory: the Ray Data pipeline against a plain single-process PIL loop.

Starts its own S3 endpoint (a moto server in a separate process, so it does not share the loop's
GIL), generates ``--images`` synthetic 1024x768 JPEGs into it with ``kind: synth``, then times,
over the same objects, resized to ``--size``:

* loop: read bytes, ``Image.open(...).convert("RGB").resize(...)``, scale to [0, 1], one at a time;
* loop+draft: the same loop with :func:`lesion_ray.preprocess.decode_image` (JPEG draft mode);
* ray: :func:`lesion_ray.preprocess.image_dataset` consumed as a stream.

Peak memory (sum of the proportional set size of the driver and every Ray process) is measured for
``--images`` and for ``--memory-factor`` times as many items; the larger run lists each stored
object ``--memory-factor`` times, which costs the pipeline exactly as many reads and decodes.

    python benchmarks/bench_preprocess.py                      # 2,000 images, memory at 2,000 vs 20,000
    python benchmarks/bench_preprocess.py --images 200 --memory-factor 5   # a quick look (~2 min)
    python benchmarks/bench_preprocess.py --cache runs/bench-images    # generate once, reuse after
    python benchmarks/bench_preprocess.py --local --compare-devices --images 256 --size 512   # GPU vs CPU

``--compare-devices`` runs the same images through the pipeline's GPU resize path (``device="cuda"``: CPU
decoding tasks, then resize actors on the GPU) and its CPU path, under Ray, and checks that every image's
pixels agree within 1/255; it times both. ``--local`` keeps the images in a local folder (no moto needed).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch
from common import (  # benchmarks/common.py: the script's folder is on sys.path
    PeakMemory,
    Results,
    add_result_args,
    image_folder,
    start_s3,
)
from PIL import Image

from lesion_ray import cluster, data, preprocess, spec, storage, synth
from lesion_ray.settings import Settings


def bench_images(n: int, cache: str | None, settings: Settings) -> list[str]:
    """``n`` synthetic 1024x768 JPEGs in the benchmark's S3: generated there, or copied from ``cache``
    (generated into it on the first run) so that reruns skip the generation."""
    target = cache or "s3://bench/isic"
    if not (cache and storage.exists(cache)):
        raw = {
            "kind": "synth",
            "name": "bench",
            "output": target,
            "num_images": n,
            "validation_images": 0,
            "width": [1024, 1024],
            "aspect": [0.75, 0.75],
            "tasks": [1],
        }
        synth.run(spec.from_dict(synth.SynthSpec, raw, "bench"), settings)
    images = [s.image for s in data.discover(target).samples][:n]
    if len(images) < n:
        raise SystemExit(f"{cache} holds {len(images)} images, fewer than --images {n}: delete it to regenerate")
    if not cache:
        return images
    uris = [f"s3://bench/isic/{storage.basename(uri)}" for uri in images]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda src, dst: storage.write_bytes(dst, storage.read_bytes(src)), images, uris))
    return uris


def plain_loop(uris: list[str], size: int) -> None:
    for uri in uris:
        im = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB").resize((size, size), Image.BILINEAR)
        np.asarray(im, np.float32) / 255


def draft_loop(uris: list[str], size: int) -> None:
    for uri in uris:
        pixels, _ = preprocess.decode_image(storage.read_bytes(uri), target=size)
        preprocess.to_model_input([pixels], size)


def ray_pipeline(uris: list[str], size: int) -> None:
    rows = errors = 0
    for batch in preprocess.image_dataset(uris, size=size, batch_size=32).iter_batches(batch_size=256):
        rows += len(batch["id"])
        errors += int((batch["error"] != "").sum())
    if rows != len(uris) or errors:
        raise RuntimeError(f"pipeline returned {rows} rows with {errors} errors for {len(uris)} inputs")


def device_rows(uris: list[str], size: int, device: str) -> tuple[dict[str, np.ndarray], float]:
    """Each image's model input from the pipeline on ``device`` (by id, scaled to [0, 1]) and the images/s."""
    start = time.perf_counter()
    rows = {}
    for batch in preprocess.image_dataset(uris, size=size, batch_size=32, device=device).iter_batches(batch_size=256):
        if (batch["error"] != "").any():
            raise RuntimeError(f"the {device} path failed on some images: {set(batch['error']) - {''}}")
        scale = 255 if batch["image"].dtype == np.uint8 else 1  # uint8 rows, or float32 in [0, 1]
        rows.update((str(i), image.astype(np.float32) / scale) for i, image in zip(batch["id"], batch["image"],
                                                                                   strict=True))
    return rows, len(uris) / (time.perf_counter() - start)


def compare_devices(uris: list[str], size: int, results: Results) -> None:
    """The GPU resize path against the CPU path on the same images: within 1/255 everywhere, and their rates."""
    device_rows(uris[:32], size, "cpu")  # start Ray's workers before timing
    cpu, cpu_rate = device_rows(uris, size, "cpu")
    results.add(f"CPU path images/s ({len(uris)} images to {size}x{size})", cpu_rate)
    if not ray.cluster_resources().get("GPU"):
        print("SKIP the GPU path: the Ray cluster has no GPU (the CPU path ran alone)")
        results.skipped("GPU path within 1/255 of the CPU path", "no GPU")
        return
    device_rows(uris[:32], size, "cuda")  # the resize actors' start and CUDA init
    gpu, gpu_rate = device_rows(uris, size, "cuda")
    worst = max(float(np.abs(gpu[i] - cpu[i]).max()) for i in cpu)
    results.add(f"GPU path images/s (decode on CPU tasks, resize on the GPU; {len(uris)} images)", gpu_rate)
    results.add("GPU path: max |GPU - CPU| x 255 over all pixels", worst * 255, "<= 1", worst <= 1 / 255 + 1e-6)


def timed(fn: Callable[[list[str], int], None], uris: list[str], size: int) -> float:
    start = time.perf_counter()
    fn(uris, size)
    return len(uris) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="generated 1024x768 JPEGs (default 2000)")
    parser.add_argument("--size", type=int, default=256, help="model input size (default 256)")
    parser.add_argument("--memory-factor", type=int, default=10, help="items in the large memory run / --images")
    parser.add_argument("--cache", help="local folder to keep the generated images in between runs")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for Ray (default 4 on 2 cores)")
    parser.add_argument("--local", action="store_true", help="images in a local folder instead of moto S3")
    parser.add_argument("--compare-devices", action="store_true",
                        help="only the GPU path against the CPU path (within 1/255, and their rates)")
    add_result_args(parser, "preprocess")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loops are single-process, single-thread baselines

    if args.local:
        compare_local(args)
        return
    server, settings = start_s3("bench")  # the benchmark's own S3 endpoint, like tests/conftest.py's
    try:
        ray.init(
            address="local",  # a Ray of its own, even when a `ray start` cluster runs on this machine
            num_cpus=args.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=cluster.runtime_env(settings),
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        uris = bench_images(args.images, args.cache, settings)
        generate_s = time.perf_counter() - start
        if args.compare_devices:
            compare_devices(uris, args.size, Results(args.results, args.step))
            return
        ray_pipeline(uris[:64], args.size)  # start Ray's workers before timing
        results = {
            "loop": timed(plain_loop, uris, args.size),
            "loop+draft": timed(draft_loop, uris, args.size),
            "ray": timed(ray_pipeline, uris, args.size),
        }
        peaks = []
        for items in (uris, uris * args.memory_factor):
            with PeakMemory(exclude=server.pid, every_s=0.5) as memory:
                ray_pipeline(items, args.size)
            peaks.append(memory.peak / 2**20)
    finally:
        ray.shutdown()
        server.terminate()

    print("== bench_preprocess ==")
    print(
        f"  machine        : {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Ray {ray.__version__}, Ray num_cpus={args.num_cpus}"
    )
    print(f"  date           : {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()}")
    print(f"  data           : {args.images} synthetic 1024x768 JPEGs in S3 (moto), ready in {generate_s:.0f} s")
    print(f"  resize to      : {args.size}x{args.size}")
    for name, rate in results.items():
        print(f"  {name:<14} : {rate:.1f} images/s")
    print(f"  ray / loop     : {results['ray'] / results['loop']:.2f}x")
    print(
        f"  peak memory    : {peaks[0]:.0f} MiB at {len(uris)} images, "
        f"{peaks[1]:.0f} MiB at {len(uris) * args.memory_factor} ({peaks[1] / peaks[0]:.2f}x)"
    )


def compare_local(args: argparse.Namespace) -> None:
    """``--local``: the images in a local folder (a temporary one, or ``--cache``); only ``--compare-devices``."""
    if not args.compare_devices:
        raise SystemExit("--local goes with --compare-devices (the loop comparison reads from moto S3)")
    import tempfile

    settings = Settings.build()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env=cluster.runtime_env(settings))
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        root = args.cache or tempfile.mkdtemp(prefix="bench-preprocess-")
        _, uris, seconds = image_folder(root, args.images, settings, width=(1024, 1024), aspect=(0.75, 0.75))
        print(f"== bench_preprocess --compare-devices: {len(uris)} 1024x768 JPEGs in {root} (ready in {seconds:.0f} "
              f"s), to {args.size}x{args.size}, Ray num_cpus={args.num_cpus} ==")
        compare_devices(uris, args.size, Results(args.results, args.step))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
