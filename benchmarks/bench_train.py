"""Training throughput: Ray Train (one worker) against a plain PyTorch loop, in one run.

Both train the same model with the same loss, augmentation, optimiser, batch size, thread count
and preprocessed images (synthetic ISIC data, decoded and resized once by ``train.prepare``).
The Ray Train figure is the workers' own ``train_images_per_s`` (the training phase of each
epoch: Ray Data shard iteration, augmentation, forward, backward, step), the median over epochs
after the first; the plain loop runs before and after Ray Train so machine load drifts show.

    python benchmarks/bench_train.py                       # CPU, small U-Net at 64x64 (~3 min on 2 cores)
    python benchmarks/bench_train.py --plain-only --device cuda --architecture multitask_unet \\
        --size 512 --precision bf16 --batch-size 16 --images 128   # GPU ceiling per GPU (no Ray needed)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from lesion_ray.augment import AugmentConfig, augment
from lesion_ray.losses import LossConfig, compute_loss
from lesion_ray.models import ModelConfig, build_model


def plain_loop(images: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> float:
    """Images/s of a plain PyTorch training loop over in-memory batches (after one warm-up epoch)."""
    torch.manual_seed(0)
    model = build_model(_model_config(args)).to(device).train()
    loss_config = LossConfig(name=args.loss)
    if loss_config.name == "bce":
        model.head1.requires_grad_(False)
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=1e-3)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    generator = torch.Generator(device=device).manual_seed(0)
    rates = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        for i in range(0, len(images), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = images[idx].to(device, non_blocking=True).float() / 255
            y = masks[idx].to(device, non_blocking=True).float()
            x, y = augment(x, y, AugmentConfig(), generator)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                outputs = model(x)
            loss = compute_loss(outputs, y, present[idx].to(device), loss_config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(architecture=args.architecture, task=args.task, input_size=args.size,
                       num_filters=args.filters, depth=args.depth)


def gpu_busy_share(fn) -> tuple[float, float]:
    """Run ``fn`` while sampling the GPU's utilisation (NVML, every 50 ms); (result, mean busy share)."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, statistics.mean(samples) / 100 if samples else float("nan")


def prepare_run(args: argparse.Namespace, folder: str):
    """Synthetic data, a one-worker train spec, and its preprocessed training tensors (Ray started)."""
    import numpy as np
    import ray

    from lesion_ray import data, spec, synth, train

    isic = f"{folder}/isic"
    config = spec.from_dict(synth.SynthSpec, {"kind": "synth", "name": "bench", "output": isic,
                                              "num_images": args.images, "validation_images": 0,
                                              "width": [96, 128], "tasks": [args.task]}, "bench")
    for index in range(args.images):
        synth.write_image(config, index)
    raw = {"kind": "train", "name": "bench", "data": isic, "output": f"{folder}/run", "registry": f"{folder}/reg",
           "model": _model_config(args).model_dump(), "loss": {"name": args.loss}, "epochs": args.epochs,
           "batch_size": args.batch_size, "num_workers": 1, "cpus_per_worker": args.threads,
           "val_fraction": 0.1, "use_gpu": args.device == "cuda", "precision": args.precision}
    train_spec = spec.from_dict(train.TrainSpec, raw, "bench")
    ray.init(num_cpus=max(args.threads + 1, 2), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    splits = data.split_samples(data.discover(isic, task=args.task).samples, 0.1, 0)
    datasets, _ = train.prepare(splits, train_spec)
    rows = datasets["train"].take_all()
    tensors = [torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("image", "mask", "present")]
    return train_spec, tensors


def ray_train(train_spec, folder: str) -> tuple[float, float]:
    """Ray Train on one worker: (median worker images/s over epochs 2.., end-to-end wall seconds)."""
    import json

    from lesion_ray import train
    from lesion_ray.settings import Settings

    start = time.perf_counter()
    train.run(train_spec, Settings.build())
    wall = time.perf_counter() - start
    with open(f"{folder}/run/metrics.json") as f:
        history = json.load(f)
    return statistics.median(row["train_images_per_s"] for row in history[1:]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs of the Ray worker)")
    parser.add_argument("--architecture", default="unet", choices=["unet", "multitask_unet"])
    parser.add_argument("--task", type=int, default=1, choices=[1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--loss", default="bce", choices=["bce", "seed"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--plain-only", action="store_true", help="only the plain loop on random data (no Ray)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c = 1 if args.task == 1 else 5
    print(f"== bench_train: {args.architecture} task {args.task} {args.size}x{args.size} filters={args.filters} "
          f"batch={args.batch_size} threads={args.threads} {args.precision} on {args.device} ==")
    if args.plain_only:
        images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8)
        masks = (torch.rand(args.images, c, args.size, args.size) > 0.7).to(torch.uint8)
        present = masks.amax(dim=(2, 3)).float()
        if args.device == "cuda":
            images, masks, present = images.cuda(), masks.cuda(), present.cuda()
            rate, busy = gpu_busy_share(lambda: plain_loop(images, masks, present, args, device))
            print(f"  plain PyTorch : {rate:8.1f} images/s, GPU busy {100 * busy:.0f}% of the time "
                  f"({torch.cuda.get_device_name()}, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
        else:
            print(f"  plain PyTorch : {plain_loop(images, masks, present, args, device):8.1f} images/s")
        return
    import ray

    with tempfile.TemporaryDirectory() as folder:
        train_spec, (images, masks, present) = prepare_run(args, folder)
        before = plain_loop(images, masks, present, args, device)
        ray_rate, wall = ray_train(train_spec, folder)
        after = plain_loop(images, masks, present, args, device)
        ray.shutdown()
    plain = (before + after) / 2
    print(f"  images        : {len(images)} training images, {args.epochs} epochs (median of epochs 2..)")
    print(f"  plain PyTorch : {plain:8.1f} images/s (runs: {before:.1f}, {after:.1f})")
    print(f"  Ray Train x1  : {ray_rate:8.1f} images/s (end to end incl. startup/preprocess/checkpoints: {wall:.0f} s)")
    print(f"  ratio         : {ray_rate / plain:8.2f}x (goal >= 0.90x)")


if __name__ == "__main__":
    main()
