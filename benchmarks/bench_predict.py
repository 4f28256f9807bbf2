"""Batch inference throughput and memory: ``kind: predict`` against its limits, in one run.

    python benchmarks/bench_predict.py                      # 1,000 images, memory at 1,000 vs 10,000
    python benchmarks/bench_predict.py --images 200 --scale 2 --sequential-images 50   # a quick look
    python benchmarks/bench_predict.py --local --data /tmp/predict-data --images 10000 --distinct-images 500 \\
        --width 1024 1024 --aspect 0.75 0.75 --architecture multitask_unet --input-size 512 --batch-size 32 \\
        --precision bf16 --decode gpu cpu --gpus-per-actor auto --threads 2 --scale 1   # issue 14's goal run

What it does, against a moto S3 server it starts (a subprocess, left out of the memory figures), or
with ``--local`` against a local folder:
1. ``kind: synth`` writes ``--images`` synthetic ISIC images to S3; an untrained U-Net of the chosen
   size is published to a registry (its speed does not depend on its weights);
2. forward-only: the model on ready uint8 batches through ``inference.Runner`` as the actors run it
   (copied to the device and scaled there, autocast, channels_last, compile), same batch size, input
   size and torch threads, fp16 probabilities back on the host: in this process (with ``--precision``
   other than fp32 also at fp32, for the ratio), and in as many Ray actors side by side, with the same
   CPUs and GPUs, as the job places (:func:`lesion_ray.predict.actor_layout`): the limit the pipeline can
   reach with that layout. The machine's speed drifts over minutes, so the layout's rate is taken before
   and after each job and the job is compared with their mean;
3. end-to-end: ``predict.run`` from S3 to S3 (list, read, decode, resize, infer, resize back,
   threshold, PNG, write, manifest), whole-job wall clock and steady state (10th-90th percentile
   of the rows' finish times), once per ``--decode`` (cpu: decoding tasks; gpu: nvJPEG in the actor);
4. sequential: a batch-1 loop that reads, decodes, resizes, predicts and writes one image at a
   time, like the seed's inference script (same decode and post-processing functions);
5. storage only: one GET of each image and one PUT of a mask from 32 threads, no compute: what the
   endpoint itself allows (moto is a single Python process: on a big machine it is the limit);
6. memory: peak proportional set size (PSS, shared pages split fairly) of this driver and every
   Ray process, sampled every second, predicting ``--images`` and then ``--scale`` times as many
   (the images copied under new ids; ``--scale 1`` leaves it out).

``--distinct-images`` draws fewer images and copies them under new ids up to ``--images`` (generating
10,000 ISIC-size images would take longer than predicting them); ``--data`` keeps them for the next run.
``--sequential-images 0`` and ``--no-storage-check`` leave out steps 4 and 5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from common import (  # benchmarks/common.py: the script's folder is on sys.path
    PeakMemory,
    Results,
    add_result_args,
    copy_images,
    image_folder,
    publish_model,
    start_s3,
)

from lesion_ray import cluster, inference, outputs, postprocess, predict, preprocess, registry, storage, synth
from lesion_ray.cluster import LocalCluster
from lesion_ray.models import ModelConfig
from lesion_ray.settings import Settings
from lesion_ray.spec import from_dict

BUCKET = "bench"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_forward(runner: inference.Runner, size: int, batch_size: int, images: int,
                  device: str) -> tuple[float, float, int]:
    """(start, end, images) of the actors' forward pass on ready batches, after a warm-up: uint8 rows on the host
    in (copied to the device, scaled there), fp16 mask probabilities back on the host, as a ``decode: cpu`` actor
    does. Wall-clock times, comparable between processes."""
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    batches = max(3, images // batch_size)
    for _ in range(3):  # warm-up: cuDNN's algorithm search
        runner(x)
    _sync(device)
    start = time.time()
    for _ in range(batches):
        runner(x)[0].half().cpu()
    return start, time.time(), batches * batch_size


def forward_only(runner: inference.Runner, size: int, batch_size: int, images: int, device: str) -> float:
    """Images/s of :func:`timed_forward`: the pipeline's limit."""
    start, end, done = timed_forward(runner, size, batch_size, images, device)
    return done / (end - start)


@ray.remote
class ForwardActor:
    """:func:`timed_forward` in an actor placed as the job's inference actors are."""

    def __init__(self, model_dir: str, device: str, runtime: inference.ModelRuntime, size: int, batch_size: int,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.runner = inference.Runner(registry.load_model(model_dir).model, device, runtime, size, batch_size)
        self.device, self.size, self.batch_size = device, size, batch_size

    def ready(self) -> None:
        """Returns once the model is loaded."""

    def run(self, images: int) -> tuple[float, float, int]:
        return timed_forward(self.runner, self.size, self.batch_size, images, self.device)


def layout_forward_only(spec: predict.PredictSpec, model_dir: str, size: int, images: int) -> float:
    """Images/s of ``spec``'s inference actors (as :func:`lesion_ray.predict.actor_layout` places them) all
    running their forward pass at once, ``images`` each: the pipeline's limit with that layout."""
    device = "cuda" if spec.gpus_per_actor else "cpu"
    actors = [ForwardActor.options(num_cpus=spec.cpus_per_actor, num_gpus=spec.gpus_per_actor).remote(
        model_dir, device, spec, size, spec.batch_size, spec.cpus_per_actor) for _ in range(spec.max_actors)]
    try:
        ray.get([actor.ready.remote() for actor in actors])  # every model loaded: the timed loops start together
        runs = ray.get([actor.run.remote(images) for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    return sum(done for _, _, done in runs) / (max(end for _, end, _ in runs) - min(start for start, _, _ in runs))


def sequential(runner: inference.Runner, config: ModelConfig, sources: list[str], out: str) -> float:
    """Images/s of a batch-1 loop: read, decode, resize, predict, resize back, threshold, PNG, write."""
    start = time.perf_counter()
    with torch.inference_mode():
        for uri in sources:
            image, (height, width) = preprocess.decode_image(storage.read_bytes(uri), target=config.input_size)
            probs = runner(torch.from_numpy(preprocess.to_model_input([image], config.input_size)))[0][0].cpu().numpy()
            masks = postprocess.to_masks(probs, height, width, 0.5)
            names = outputs.mask_names(storage.basename(uri).rsplit(".", 1)[0], config.task)
            for name, mask in zip(names, masks, strict=True):
                storage.write_bytes(storage.join(out, name), postprocess.mask_png(mask))
    return len(sources) / (time.perf_counter() - start)


def decode_rates(sources: list[str], size: int, batch_size: int, device: str) -> tuple[float, float, int, int]:
    """Images/s decoding and resizing real files to model inputs in this process: as a ``decode: gpu`` actor
    does (``inference.ModelInputs`` on ``device``: nvJPEG, per-image CPU fallback) and as one decoding task's
    core does (PIL, draft mode); also how many the actor path decoded on the GPU and on the CPU."""
    blobs = [storage.read_bytes(uri) for uri in sources]
    inputs = inference.ModelInputs(device, size, preprocess.DEFAULT_MAX_PIXELS)
    inputs(blobs[:batch_size])  # warm-up: nvJPEG's handles, CUDA kernels
    inputs.on_gpu = inputs.on_cpu = 0
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(blobs), batch_size):
        inputs(blobs[i:i + batch_size])
    _sync(device)
    actor = len(blobs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for blob in blobs:
        preprocess.to_model_input([preprocess.decode_image(blob, target=size)[0]], size)
    return actor, len(blobs) / (time.perf_counter() - start), inputs.on_gpu, inputs.on_cpu


def storage_ceiling(sources: list[str], out: str, mask: bytes, threads: int = 32) -> float:
    """Images/s the endpoint serves with no compute at all: one GET of the image, one PUT of a mask each."""
    def one(uri: str) -> None:
        storage.read_bytes(uri)
        storage.write_bytes(storage.join(out, storage.basename(uri) + ".png"), mask)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, sources))
    return len(sources) / (time.perf_counter() - start)


def gpus_per_actor(text: str) -> float | None:
    """``auto`` (None: the job's automatic layout) or a number of GPUs."""
    return None if text == "auto" else float(text)


def predict_spec(input_uri: str, output: str, ref: str, registry_uri: str, args: argparse.Namespace,
                 decode: str) -> predict.PredictSpec:
    raw = {"kind": "predict", "name": "bench", "input": input_uri, "model": ref, "registry": registry_uri,
           "output": output, "batch_size": args.batch_size, "cpus_per_actor": args.threads,
           "gpus_per_actor": gpus_per_actor(args.gpus_per_actor), "overlays": "none", "subset": "Training",
           "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
           "decode": decode}
    if args.actors:
        raw.update(min_actors=args.actors, max_actors=args.actors)
    return from_dict(predict.PredictSpec, raw, "bench")


def run_predict(spec: predict.PredictSpec, moto_pid: int | None, scale: int,
                settings: Settings) -> tuple[dict, float, float, int]:
    """(summary, wall seconds, steady-state images/s, peak PSS bytes) of one predict job into a fresh output."""
    if storage.exists(spec.output):
        storage.delete(spec.output)
    # One PSS sample of every Ray process costs ~0.13 s of CPU here: once a second, and only when memory is reported.
    sampling = PeakMemory(exclude=moto_pid, every_s=1.0) if scale > 1 else contextlib.nullcontext()
    with sampling as memory:
        start = time.perf_counter()
        summary = predict.run(spec, settings)
        wall = time.perf_counter() - start
    assert summary["ok"] == summary["inputs"], summary
    finished = pq.read_table(io.BytesIO(storage.read_bytes(summary["manifest"])), columns=["finished_at"])
    times = np.sort(finished["finished_at"].to_numpy().astype("datetime64[ms]").astype(np.int64)) / 1000
    lo, hi = int(0.1 * len(times)), int(0.9 * len(times))
    steady = (hi - lo) / max(times[hi - 1] - times[lo], 1e-9)
    return summary, wall, steady, memory.peak if memory else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images generated and predicted (default 1000)")
    parser.add_argument("--distinct-images", type=int, help="draw only this many, copy them up to --images")
    parser.add_argument("--data", help="local folder to keep the images in and reuse (default: a temporary one)")
    parser.add_argument("--scale", type=int, default=10, help="memory run predicts images x scale (default 10; "
                                                               "1: no memory run)")
    parser.add_argument("--sequential-images", type=int, default=200, help="images for the batch-1 loop (0: none)")
    parser.add_argument("--storage-check", action=argparse.BooleanOptionalAction, default=True,
                        help="time the storage alone (GET + PUT, no compute)")
    parser.add_argument("--forward-images", type=int, help="images timed forward-only (default: --images, "
                                                           "at most 1000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--architecture", choices=["unet", "multitask_unet"], default="unet",
                        help="unet: the tutorial's U-Net; multitask_unet: the seed's VGG16 U-Net")
    parser.add_argument("--task", type=int, choices=[1, 2], default=1, help="1: one mask; 2: five attribute masks")
    parser.add_argument("--input-size", type=int, default=64, help="model input resolution (default 64)")
    parser.add_argument("--num-filters", type=int, default=32, help="U-Net width (default 32, the tutorial's)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per inference actor")
    parser.add_argument("--actors", type=int, help="inference actors (default: the job's own layout)")
    parser.add_argument("--gpus-per-actor", default="0", help="GPUs per actor, or auto (the job's default layout)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (the job falls back to eager)")
    parser.add_argument("--decode", nargs="+", choices=["cpu", "gpu"], default=["cpu"],
                        help="one predict job per mode (gpu: nvJPEG in the inference actor)")
    parser.add_argument("--goal", type=float, default=0.85, help="whole job / the layout's forward-only goal "
                                                                  "(default 0.85)")
    parser.add_argument("--loop-goal", type=float, default=1.3, help="whole job / batch-1 loop goal, --scale x "
                                                                     "--images (default 1.3)")
    parser.add_argument("--width", type=int, nargs=2, default=(600, 1024), help="synthetic image widths")
    parser.add_argument("--aspect", type=float, nargs=2, default=(0.66, 0.75), help="synthetic height/width")
    parser.add_argument("--cpus", type=int, help="logical CPUs for Ray (default: the embedded cluster's, at least "
                                                 f"{cluster.MIN_LOCAL_CPUS})")
    parser.add_argument("--object-store-gb", type=float, default=1.0, help="Ray object store size (default 1)")
    parser.add_argument("--stats", action="store_true", help="log Ray Data's per-operator statistics")
    parser.add_argument("--local", action="store_true",
                        help="keep images and masks in a local folder instead of the S3 endpoint (which is then "
                             "not the bottleneck; no moto needed)")
    add_result_args(parser, "predict")
    args = parser.parse_args()
    results = Results(args.results, args.step)

    moto, settings = start_s3(BUCKET) if not args.local else (None, Settings.build())
    work = tempfile.mkdtemp(prefix="bench-predict-")
    try:
        # The embedded default a job gets (its Ray settings), with Ray's own lines in a log file.
        cluster.start_local(LocalCluster(num_cpus=args.cpus, object_store_memory=int(args.object_store_gb * 2**30)),
                            settings, log_file=os.path.join(work, "ray.log"))
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().enable_auto_log_stats = args.stats
        torch.set_num_threads(args.threads)
        resources = ray.cluster_resources()
        gpus, ray_cpus = resources.get("GPU", 0), resources["CPU"]
        on_gpu = gpus > 0 and (args.gpus_per_actor == "auto" or float(args.gpus_per_actor) > 0)
        device = "cuda" if on_gpu else "cpu"
        root = (args.data or os.path.join(work, "store")) if args.local else f"s3://{BUCKET}"
        inputs, sources, generated = image_folder(f"{root}/data", args.images, settings,
                                                  distinct=args.distinct_images, width=tuple(args.width),
                                                  aspect=tuple(args.aspect))
        config = ModelConfig(architecture=args.architecture, task=args.task, input_size=args.input_size,
                             num_filters=args.num_filters, depth=args.depth)
        registry_uri = os.path.join(work, "registry")
        ref = publish_model(config, registry_uri, os.path.join(work, "model"))
        model = registry.load_model(ref, registry_uri, device).model
        runtime = {"channels_last": args.channels_last, "compile": args.compile}
        size, batch = config.input_size, args.batch_size
        runner = inference.Runner(model, device, inference.ModelRuntime(precision=args.precision, **runtime), size,
                                  batch)
        timed = args.forward_images or min(args.images, 1000)
        limit = forward_only(runner, size, batch, timed, device)
        fp32 = limit if args.precision == "fp32" else forward_only(
            inference.Runner(model, device, inference.ModelRuntime(precision="fp32", **runtime), size, batch),
            size, batch, timed, device)
        if "gpu" in args.decode:
            decodes = decode_rates(sources[: min(len(sources), 16 * batch)], size, batch, device)
        model_dir = registry.resolve(ref, registry_uri).model_dir
        moto_pid = moto.pid if moto else None
        forward: list[float] = []  # the layout's forward-only rates: before the first job, then after each

        def job(input_uri: str, output: str, decode: str) -> tuple[dict, float, float, int, float]:
            """run_predict's figures and the layout's forward-only rate around the job (the mean of before and
            after: the machine's speed drifts over minutes)."""
            spec = predict_spec(input_uri, output, ref, registry_uri, args, decode)
            layout = predict.actor_layout(spec, int(gpus), preprocess.one_node_cores(), ray_cpus)
            if not forward:
                forward.append(layout_forward_only(layout, model_dir, size, timed))
            before = forward[-1]
            figures = run_predict(spec, moto_pid, args.scale, settings)
            forward.append(layout_forward_only(layout, model_dir, size, timed))
            return *figures, (before + forward[-1]) / 2

        jobs = {decode: job(inputs, f"{root}/out-{decode}", decode) for decode in args.decode}
        decode, (_, _, _, peak_n, _) = next(iter(jobs.items()))
        seq = sequential(runner, config, sources[: args.sequential_images], f"{root}/seq") \
            if args.sequential_images else math.nan
        ceiling = math.nan
        if args.storage_check:
            first_mask = storage.list_files(f"{root}/out-{decode}/masks")[0].uri
            ceiling = storage_ceiling(sources, f"{root}/ceiling", storage.read_bytes(first_mask))
        n, big_n = args.images, args.images * args.scale
        if args.scale > 1:
            big = f"{root}/big/{synth.SUBSET_FOLDERS['Training'][0]}"
            copy_images(sources, big, big_n)
            _, wall_big, steady_big, peak_big, forward_big = job(big, f"{root}/out-big", decode)
        layout_rate = statistics.mean(forward)
        where = "a local folder" if args.local else "moto S3"
        layout = f"{args.actors or 'auto'} actor(s), gpus_per_actor {args.gpus_per_actor}"
        print(f"""
== bench_predict ==
machine        : {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__},
                 ray {ray.__version__}, device {device}{f' ({torch.cuda.get_device_name()})' if on_gpu else ''}; \
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
setup          : {n} synthetic JPEGs {args.width[0]}-{args.width[1]} px wide ({args.distinct_images or n} distinct) in \
{where} (ready in {generated:.0f} s); {args.architecture} task {args.task}, input {args.input_size}, filters \
{args.num_filters}, depth {args.depth};
                 batch {args.batch_size}, {args.precision}{' channels_last' if args.channels_last else ''}\
{' compile' if args.compile else ''}, {args.threads} torch thread(s) per actor, {layout}, Ray num_cpus {ray_cpus:g}
forward-only   : {limit:8.1f} images/s  (this process, {args.precision}; fp32 {fp32:.1f}/s, {limit / fp32:.2f}x; \
ready uint8 batches, batch {args.batch_size})
  job's layout : {layout_rate:8.1f} images/s  (its inference actors side by side, before and after each \
job: {', '.join(f'{f:.1f}' for f in forward)})""")
        if "gpu" in args.decode:
            print(f"decode+resize  : {decodes[0]:8.1f} images/s  in an actor on {device} ({decodes[2]} by nvJPEG, "
                  f"{decodes[3]} on the CPU); {decodes[1]:.1f}/s on one CPU core (PIL, draft mode)")
        for mode, (summary, wall, steady, _, reference) in jobs.items():
            print(f"""end-to-end     : {n / wall:8.1f} images/s  whole job, decode {mode}, {wall:.1f} s for {n} \
({n / wall / reference:.2f}x the layout's forward-only; streaming {summary['images_per_s']:.1f}/s)
  steady state : {steady:8.1f} images/s  ({steady / reference:.2f}x)""")
        rate = n / jobs[decode][1]
        print(f"""sequential b=1 : {seq:8.1f} images/s  ({args.sequential_images} images; end-to-end is \
{rate / seq:.1f}x)
storage only   : {ceiling:8.1f} images/s  (GET image + PUT mask, 32 threads, no compute: the storage limit)""")
        if args.scale > 1:
            print(f"peak memory    : {peak_n / 2**20:8.0f} MiB at {n} images, {peak_big / 2**20:.0f} MiB at {big_n} "
                  f"images ({peak_big / peak_n:.2f}x)\n"
                  f"end-to-end     : {big_n / wall_big:8.1f} images/s  whole job, {big_n} images "
                  f"({big_n / wall_big / forward_big:.2f}x the layout's forward-only, {big_n / wall_big / seq:.2f}x "
                  f"the loop); {steady_big:.1f} steady ({steady_big / forward_big:.2f}x)")
        results.add("forward-only fp32 images/s", fp32)
        results.add("forward-only images/s, the job's layout", layout_rate)
        if args.precision != "fp32":
            results.add(f"forward-only {args.precision} images/s ({args.precision}/fp32)",
                        f"{limit:.1f} ({limit / fp32:.2f}x)")
        for mode, (_, wall, steady, _, reference) in jobs.items():
            results.add(f"decode {mode}: whole job images/s ({n} images)", n / wall)
            results.at_least(f"decode {mode}: whole job / the layout's forward-only {args.precision}",
                             n / wall / reference, args.goal, "x")
            results.add(f"decode {mode}: steady images/s (x forward)", f"{steady:.1f} ({steady / reference:.2f}x)")
        if "gpu" in args.decode:
            results.add(f"actor decode+resize images/s on {device} (nvJPEG / CPU images)",
                        f"{decodes[0]:.1f} ({decodes[2]} / {decodes[3]})")
            results.add("CPU decode+resize images/s, one core", decodes[1])
        if args.sequential_images:
            results.add("sequential b=1 images/s", seq)
        if args.scale > 1:
            results.at_least(f"whole job / the layout's forward-only ({big_n} images)", big_n / wall_big / forward_big,
                             args.goal, "x")
            results.at_least(f"whole job / the batch-1 loop ({big_n} images)", big_n / wall_big / seq, args.loop_goal,
                             "x")
    finally:
        ray.shutdown()
        if moto:
            moto.terminate()
            moto.wait()


if __name__ == "__main__":
    main()
