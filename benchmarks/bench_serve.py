"""Online prediction throughput and latency on Ray Serve, on loopback.

    python benchmarks/bench_serve.py                       # tutorial U-Net (64 px, 32 filters)
    python benchmarks/bench_serve.py --num-filters 8 --requests 200
    python benchmarks/bench_serve.py --architecture multitask_unet --input-size 512 --precision bf16 \\
        --gpus-per-replica 0.25 --replicas 4 --concurrency 1,32 --requests 320   # the GPU suite's run

Publishes a randomly initialised U-Net into a temporary registry, serves it twice (dynamic
batching with --max-batch-size, then max_batch_size=1) with one replica per deployment, and
drives POST /v1/segment with a 1022x767 JPEG (the smallest ISIC image size; --image-size) from an asyncio
load generator at each concurrency. Also times the same work called directly in-process
(decode + resize + forward + mask at original size + PNG), so Serve's added latency is the
difference of the p50s at concurrency 1, and the bare forward pass at batch 1 and at the batch
size, which bounds what batching can gain on this hardware. Prints one results block.
"""

import argparse
import asyncio
import io
import os
import tempfile
import time

import httpx
import numpy as np
import ray
import torch
from common import Results, add_result_args, publish_model  # benchmarks/common.py, on sys.path as the script's folder
from PIL import Image
from ray import serve

from lesion_ray import inference, registry
from lesion_ray import serve as lserve
from lesion_ray.models import ModelConfig
from lesion_ray.preprocess import DEFAULT_MAX_PIXELS
from lesion_ray.registry import ModelRef
from lesion_ray.serve import deployment, ingress
from lesion_ray.settings import Settings
from lesion_ray.testing.loopback import free_port


def jpeg(width: int = 1022, height: int = 767) -> bytes:
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2 < 1
    noise = np.random.default_rng(0).integers(0, 30, (height, width, 3))
    pixels = (np.where(inside[..., None], [70, 45, 35], [205, 160, 130]) + noise).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def drive(url: str, data: bytes, concurrency: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    remaining = requests

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                r = await client.post(url, content=data, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - start)
                failures += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "failures": failures}


def direct(served: deployment.Served, data: bytes, requests: int) -> dict[str, float]:
    """The request's work without Serve: what a client calling the model in-process pays."""
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        x, orig = ingress.prepare(data, DEFAULT_MAX_PIXELS, served.loaded.config.input_size)
        ingress.union_png(deployment.forward(served, [x])[0], orig)
        latencies.append(time.perf_counter() - start)
    return {"rps": requests / sum(latencies), "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def forward_ms(runner: inference.Runner, size: int, batch: int, repeats: int = 10) -> float:
    """Milliseconds of one forward pass (the replica's Runner: normalise, autocast, sigmoid) at ``batch``."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    runner(x)
    start = time.perf_counter()
    for _ in range(repeats):
        runner(x)[0].cpu()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", choices=["unet", "multitask_unet"], default="unet")
    parser.add_argument("--task", type=int, choices=[1, 2], default=1)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--num-filters", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    parser.add_argument("--image-size", default="1022x767", help="WIDTHxHEIGHT of the uploaded JPEG")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each deployment (ingress and model)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per model replica (0: CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--goal", type=float, help="batching gain goal (default 3 on a GPU, 2 on CPUs)")
    add_result_args(parser, "serve")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    # Ray Serve's replicas get one CPU each; torch then uses one thread per replica (OMP_NUM_THREADS).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    config = ModelConfig(architecture=args.architecture, task=args.task, input_size=args.input_size,
                         num_filters=args.num_filters, depth=args.depth)
    publish_model(config, f"{work}/registry", f"{work}/model")
    data = jpeg(*(int(v) for v in args.image_size.split("x")))
    runtime = inference.ModelRuntime(precision=args.precision, channels_last=args.channels_last,
                                     compile=args.compile)
    device = "cuda" if args.gpus_per_replica else "cpu"

    torch.set_num_threads(1)  # the direct path gets what one model replica gets
    loaded = registry.load_model("bench@1", f"{work}/registry")
    served = deployment.Served(loaded, inference.Runner(loaded.model, device, runtime, config.input_size,
                                                        args.max_batch_size))
    base = direct(served, data, args.requests)
    fwd1 = forward_ms(inference.Runner(loaded.model, device, runtime, config.input_size, 1), config.input_size, 1)
    fwdb = forward_ms(served.runner, config.input_size, args.max_batch_size)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[tuple[int, int], dict[str, float]] = {}
    mean_batch: dict[int, float] = {}
    for batch in (args.max_batch_size, 1):
        spec = lserve.ServeSpec(kind="serve", name="bench", model=ModelRef("bench@1"), registry=f"{work}/registry",
                                min_replicas=args.replicas, max_replicas=args.replicas, max_batch_size=batch,
                                gpus_per_replica=args.gpus_per_replica, **runtime.model_dump(),
                                batch_wait_timeout_s=args.batch_wait_ms / 1000 if batch > 1 else 0.0,
                                max_ongoing_requests=max(64, batch), port=port)
        serve.run(lserve.build_app(spec, Settings.build()), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/segment"
        asyncio.run(drive(url, data, 4, 20))  # warm-up: connections, replicas' first batches
        for c in levels:
            results[batch, c] = asyncio.run(drive(url, data, c, max(args.requests, 4 * c)))
        replica = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["replica"]
        mean_batch[batch] = replica["images"] / replica["batches"]
        serve.delete("bench")
    serve.shutdown()

    cpus = os.cpu_count()
    load = os.getloadavg()[0]
    where = f"{args.gpus_per_replica:g} GPU ({torch.cuda.get_device_name()})" if args.gpus_per_replica else "1 CPU"
    print(f"== bench_serve: {args.architecture} task {args.task} {args.input_size}px, {args.num_filters} filters, "
          f"depth {args.depth}, {args.precision}{' channels_last' if args.channels_last else ''}"
          f"{' compile' if args.compile else ''}; {args.image_size} JPEG; {cpus} CPUs, load average {load:.1f}; "
          f"{args.replicas} ingress + {args.replicas} model replica(s) on {where} each ==")
    print(f"forward pass: batch 1 {fwd1:.1f} ms; batch {args.max_batch_size} {fwdb:.1f} ms "
          f"({fwdb / args.max_batch_size:.1f} ms/image)")
    print(f"direct in-process (decode+forward+mask+PNG, 1 thread): {base['rps']:.1f} req/s, "
          f"p50 {base['p50']:.1f} ms, p99 {base['p99']:.1f} ms")
    print("| max_batch_size | concurrency | req/s | p50 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|")
    for (batch, c), r in results.items():
        print(f"| {batch} | {c} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['failures']} |")
    top = max(levels)
    gain = results[args.max_batch_size, top]["rps"] / results[1, top]["rps"]
    print(f"batching gain at concurrency {top}: {gain:.2f}x req/s (max_batch_size {args.max_batch_size} vs 1); "
          f"mean images per forward pass over all levels: {mean_batch[args.max_batch_size]:.1f}")
    rows = Results(args.results, args.step)
    rows.add(f"forward ms: batch 1 / batch {args.max_batch_size} ({args.precision}, {device})",
             f"{fwd1:.1f} / {fwdb:.1f}")
    for batch in (args.max_batch_size, 1):
        rows.add(f"req/s at concurrency {top}, max_batch_size {batch}", results[batch, top]["rps"])
    rows.add(f"mean images per forward pass (max_batch_size {args.max_batch_size})", mean_batch[args.max_batch_size])
    rows.at_least(f"batching gain at concurrency {top} ({args.replicas}+{args.replicas} replicas)", gain,
                     args.goal or (3.0 if args.gpus_per_replica else 2.0), "x")
    if 1 in levels:
        added = results[1, 1]["p50"] - base["p50"]
        waited = results[args.max_batch_size, 1]["p50"] - base["p50"]
        print(f"Serve's added latency at concurrency 1 (p50 over direct): {added:.1f} ms without batching "
              f"(HTTP, proxy, 2 deployment hops), {waited:.1f} ms with batching (+ up to batch_wait)")


if __name__ == "__main__":
    main()
