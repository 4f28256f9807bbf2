"""Batch inference throughput and memory: ``kind: predict`` against its limits, in one run.

    python benchmarks/bench_predict.py                      # 1,000 images, memory at 1,000 vs 10,000
    python benchmarks/bench_predict.py --images 200 --scale 2 --sequential-images 50   # a quick look

What it does, against a moto S3 server it starts (a subprocess, left out of the memory figures), or
with ``--local`` against a local folder:
1. ``kind: synth`` writes ``--images`` synthetic ISIC images to S3; an untrained U-Net of the chosen
   size is published to a registry (its speed does not depend on its weights);
2. forward-only: the model on ready tensors in this process, same batch size, input size and
   torch threads as the pipeline's actor: the limit the pipeline can reach;
3. end-to-end: ``predict.run`` from S3 to S3 (list, read, decode, resize, infer, resize back,
   threshold, PNG, write, manifest), whole-job wall clock and steady state (10th-90th percentile
   of the rows' finish times);
4. sequential: a batch-1 loop that reads, decodes, resizes, predicts and writes one image at a
   time, like the seed's inference script (same decode and post-processing functions);
5. storage only: one GET of each image and one PUT of a mask from 32 threads, no compute: what the
   endpoint itself allows (moto is a single Python process: on a big machine it is the limit);
6. memory: peak proportional set size (PSS, shared pages split fairly) of this driver and every
   Ray process, sampled every 0.2 s, predicting ``--images`` and then ``--scale`` times as many
   (the images copied under new ids).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from common import PeakMemory, publish_model, start_s3  # benchmarks/common.py: the script's folder is on sys.path

from lesion_ray import cluster, inference, predict, preprocess, registry, storage, synth
from lesion_ray.models import ModelConfig
from lesion_ray.settings import Settings
from lesion_ray.spec import from_dict

BUCKET = "bench"


def forward_only(runner: inference.Runner, config: ModelConfig, batch_size: int, images: int) -> float:
    """Images/s of the actors' forward pass (uint8 rows in, probabilities out on the host) on ready batches:
    the pipeline's limit."""
    x = torch.randint(0, 256, (batch_size, 3, config.input_size, config.input_size), dtype=torch.uint8)
    batches = max(3, images // batch_size)
    for _ in range(3):
        runner(x)
    start = time.perf_counter()
    for _ in range(batches):
        runner(x)[0].half().cpu()
    return batches * batch_size / (time.perf_counter() - start)


def sequential(runner: inference.Runner, config: ModelConfig, sources: list[str], out: str) -> float:
    """Images/s of a batch-1 loop: read, decode, resize, predict, resize back, threshold, PNG, write."""
    start = time.perf_counter()
    with torch.inference_mode():
        for uri in sources:
            image, (height, width) = preprocess.decode_image(storage.read_bytes(uri), target=config.input_size)
            x = preprocess.to_model_input([image], config.input_size)
            probs = runner(x)[0][0].cpu().numpy()
            masks = inference.to_masks(probs, height, width, 0.5)
            names = predict.mask_names(storage.basename(uri).rsplit(".", 1)[0], config.task)
            for name, mask in zip(names, masks, strict=True):
                storage.write_bytes(storage.join(out, name), inference.mask_png(mask))
    return len(sources) / (time.perf_counter() - start)


def storage_ceiling(sources: list[str], out: str, mask: bytes, threads: int = 32) -> float:
    """Images/s the endpoint serves with no compute at all: one GET of the image, one PUT of a mask each."""
    def one(uri: str) -> None:
        storage.read_bytes(uri)
        storage.write_bytes(storage.join(out, storage.basename(uri) + ".png"), mask)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, sources))
    return len(sources) / (time.perf_counter() - start)


def replicate(sources: list[str], folder: str, copies: int) -> None:
    """``copies`` copies of every source under new ISIC ids in ``folder`` (more images, same content)."""
    def copy(item: tuple[int, str]) -> None:
        index, uri = item
        data = storage.read_bytes(uri)
        for k in range(copies):
            storage.write_bytes(storage.join(folder, f"ISIC_{k * len(sources) + index:07d}.jpg"), data)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(copy, enumerate(sources)))


def run_predict(input_uri: str, output: str, ref: str, registry_uri: str, args: argparse.Namespace,
                moto_pid: int, settings: Settings) -> tuple[dict, float, float, int]:
    """(summary, wall seconds, steady-state images/s, peak PSS bytes) of one predict job."""
    spec = from_dict(predict.PredictSpec, {
        "kind": "predict", "name": "bench", "input": input_uri, "model": ref, "registry": registry_uri,
        "output": output, "batch_size": args.batch_size, "min_actors": args.actors, "max_actors": args.actors,
        "cpus_per_actor": args.threads, "gpus_per_actor": args.gpus_per_actor, "overlays": "none",
        "subset": "Training"}, "bench")
    with PeakMemory(exclude=moto_pid) as memory:
        start = time.perf_counter()
        summary = predict.run(spec, settings)
        wall = time.perf_counter() - start
    assert summary["ok"] == summary["inputs"], summary
    finished = pq.read_table(io.BytesIO(storage.read_bytes(summary["manifest"])), columns=["finished_at"])
    times = np.sort(finished["finished_at"].to_numpy().astype("datetime64[ms]").astype(np.int64)) / 1000
    lo, hi = int(0.1 * len(times)), int(0.9 * len(times))
    steady = (hi - lo) / max(times[hi - 1] - times[lo], 1e-9)
    return summary, wall, steady, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images generated and predicted (default 1000)")
    parser.add_argument("--scale", type=int, default=10, help="memory run predicts images x scale (default 10)")
    parser.add_argument("--sequential-images", type=int, default=200, help="images for the batch-1 loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--architecture", choices=["unet", "multitask_unet"], default="unet",
                        help="unet: the tutorial's U-Net; multitask_unet: the seed's VGG16 U-Net")
    parser.add_argument("--task", type=int, choices=[1, 2], default=1, help="1: one mask; 2: five attribute masks")
    parser.add_argument("--input-size", type=int, default=64, help="model input resolution (default 64)")
    parser.add_argument("--num-filters", type=int, default=32, help="U-Net width (default 32, the tutorial's)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per inference actor")
    parser.add_argument("--actors", type=int, default=1, help="inference actors")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--width", type=int, nargs=2, default=(600, 1024), help="synthetic image widths")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="logical CPUs for Ray")
    parser.add_argument("--object-store-gb", type=float, default=1.0, help="Ray object store size (default 1)")
    parser.add_argument("--stats", action="store_true", help="log Ray Data's per-operator statistics")
    parser.add_argument("--local", action="store_true",
                        help="keep images and masks in a local folder instead of the S3 endpoint (which is then "
                             "not the bottleneck)")
    args = parser.parse_args()

    moto, settings = start_s3(BUCKET)
    work = tempfile.mkdtemp(prefix="bench-predict-")
    try:
        ray.init(address="local", num_cpus=args.cpus, object_store_memory=int(args.object_store_gb * 2**30),
                 include_dashboard=False, log_to_driver=False, runtime_env=cluster.runtime_env(settings))
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().enable_auto_log_stats = args.stats
        torch.set_num_threads(args.threads)
        device = "cuda" if args.gpus_per_actor > 0 else "cpu"
        root = os.path.join(work, "store") if args.local else f"s3://{BUCKET}"
        data_uri = f"{root}/data"
        start = time.perf_counter()
        synth.run(from_dict(synth.SynthSpec, {"kind": "synth", "name": "bench", "output": data_uri,
                                              "num_images": args.images, "validation_images": 0, "tasks": [1],
                                              "width": list(args.width)}, "bench"), settings)
        generated = time.perf_counter() - start
        inputs = f"{data_uri}/{synth.SUBSET_FOLDERS['Training'][0]}"
        sources = [f.uri for f in storage.list_files(inputs)]

        config = ModelConfig(architecture=args.architecture, task=args.task, input_size=args.input_size,
                             num_filters=args.num_filters, depth=args.depth)
        registry_uri = os.path.join(work, "registry")
        ref = publish_model(config, registry_uri, os.path.join(work, "model"))
        runner = inference.Runner(registry.load_model(ref, registry_uri).model, device, inference.ModelRuntime(),
                                  config.input_size, args.batch_size)
        limit = forward_only(runner, config, args.batch_size, args.images)
        _, wall, steady, peak_n = run_predict(inputs, f"{root}/out", ref, registry_uri, args, moto.pid, settings)
        seq = sequential(runner, config, sources[: args.sequential_images], f"{root}/seq")
        first_mask = storage.list_files(f"{root}/out/masks")[0].uri
        ceiling = storage_ceiling(sources, f"{root}/ceiling", storage.read_bytes(first_mask))

        big = f"{root}/big/{synth.SUBSET_FOLDERS['Training'][0]}"
        replicate(sources, big, args.scale)
        _, wall_big, steady_big, peak_big = run_predict(big, f"{root}/out-big", ref, registry_uri, args, moto.pid,
                                                        settings)
        rate = args.images / wall
        where = "a local folder" if args.local else "moto S3"
        n, big_n = args.images, args.images * args.scale
        print(f"""
== bench_predict ==
machine        : {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},
                 ray {ray.__version__}, device {device}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
setup          : {n} synthetic JPEGs {args.width[0]}-{args.width[1]} px wide in {where} (generated in
                 {generated:.0f} s); {args.architecture} task {args.task}, input {args.input_size}, filters \
{args.num_filters}, depth {args.depth};
                 batch {args.batch_size}, {args.threads} torch thread(s) per actor, {args.actors} actor(s),
                 Ray num_cpus {args.cpus}
forward-only   : {limit:8.1f} images/s  (ready tensors, batch {args.batch_size}, {args.threads} thread(s))
end-to-end     : {rate:8.1f} images/s  whole job, {wall:.1f} s for {n} ({rate / limit:.2f}x forward-only)
  steady state : {steady:8.1f} images/s  ({steady / limit:.2f}x forward-only)
sequential b=1 : {seq:8.1f} images/s  ({args.sequential_images} images; end-to-end is {rate / seq:.1f}x)
storage only   : {ceiling:8.1f} images/s  (GET image + PUT mask, 32 threads, no compute: the storage limit)
peak memory    : {peak_n / 2**20:8.0f} MiB at {n} images, {peak_big / 2**20:.0f} MiB at {big_n} images \
({peak_big / peak_n:.2f}x); {big_n / wall_big:.1f} images/s whole job, {steady_big:.1f} steady
""")
    finally:
        ray.shutdown()
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
