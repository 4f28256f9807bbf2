"""Training throughput: Ray Train (one worker) against a plain PyTorch loop, in one run.

Both train the same model with the same loss, augmentation, optimiser, batch size, thread count
and preprocessed images (synthetic ISIC data, decoded and resized once by ``train.prepare``).
The Ray Train figure is the workers' own ``train_images_per_s`` (the training phase of each
epoch: Ray Data shard iteration, augmentation, forward, backward, step), the median over epochs
after the first; the plain loop runs before and after Ray Train so machine load drifts show.

    python benchmarks/bench_train.py                       # CPU, small U-Net at 64x64 (~3 min on 2 cores)
    python benchmarks/bench_train.py --plain-only --device cuda --architecture multitask_unet \\
        --size 512 --precision bf16 --batch-size 16 --images 128   # GPU ceiling per GPU (no Ray needed)
    python benchmarks/bench_train.py --device cuda --architecture multitask_unet --task 2 --loss seed \\
        --size 512 --filters 32 --precision bf16 --batch-size 16 --images 640 --threads 8   # the GPU suite's run

On a GPU the plain loop's images are on the GPU already (the most one worker can reach), and the GPU's busy
share is sampled (NVML, else nvidia-smi) during the training phase of epochs 2..N of both: the plain loop's
epochs are timed directly; Ray Train's are placed from its checkpoints' names (the time of each epoch's
report) less the epoch's own time, and trimmed by up to 1 s at the end (the checkpoint's save), so that they
fall inside the training phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from typing import TYPE_CHECKING

import torch
from common import GpuBusy, Results, add_result_args  # benchmarks/common.py, on sys.path as the script's folder

from lesion_ray.augment import AugmentConfig, augment
from lesion_ray.losses import LossConfig, compute_loss
from lesion_ray.models import ModelConfig, build_model

if TYPE_CHECKING:
    from lesion_ray.train import TrainSpec


def plain_loop(images: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, args: argparse.Namespace,
               device: torch.device) -> tuple[float, list[tuple[float, float]]]:
    """A plain PyTorch training loop over in-memory batches: (median images/s of epochs 2.., those epochs'
    (start, end) in time.time())."""
    torch.manual_seed(0)
    model = build_model(_model_config(args)).to(device).train()
    loss_config = LossConfig(name=args.loss)
    if loss_config.name == "bce":
        model.head1.requires_grad_(False)
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=1e-3)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    run = torch.compile(model) if args.compile else model
    generator = torch.Generator(device=device).manual_seed(0)
    rates, windows = [], []
    for _ in range(args.epochs):
        start, wall = time.perf_counter(), time.time()
        order = torch.randperm(len(images))
        for i in range(0, len(images), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = images[idx].to(device, non_blocking=True).float() / 255
            y = masks[idx].to(device, non_blocking=True).float()
            x, y = augment(x, y, AugmentConfig(), generator)
            x = x.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                try:
                    outputs = run(x)
                except Exception as exc:  # torch.compile failing on this machine: say so, go on eagerly
                    if run is model:
                        raise
                    print(f"  warning: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); eager instead")
                    run = model
                    outputs = run(x)
            loss = compute_loss(outputs, y, present[idx].to(device), loss_config)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - start))
        windows.append((wall, time.time()))
    return statistics.median(rates[1:]), windows[1:]


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(architecture=args.architecture, task=args.task, input_size=args.size,
                       num_filters=args.filters, depth=args.depth)


def prepare_run(args: argparse.Namespace, folder: str) -> tuple[TrainSpec, list[torch.Tensor]]:
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
           "val_fraction": 0.1, "use_gpu": args.device == "cuda", "precision": args.precision,
           # Every epoch's checkpoint stays: their names date the epochs' reports (the busy share's windows).
           "checkpoints_to_keep": args.epochs}
    if args.channels_last:  # (--compile applies to the plain loop only: the train spec has no compile key)
        raw["channels_last"] = True
    train_spec = spec.from_dict(train.TrainSpec, raw, "bench")
    ray.init(num_cpus=max(args.threads + 1, 2), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    splits = data.split_samples(data.discover(isic, task=args.task).samples, 0.1, 0)
    datasets, _ = train.prepare(splits, train_spec)
    rows = datasets["train"].take_all()
    tensors = [torch.from_numpy(np.stack([r[k] for r in rows])) for k in ("image", "mask", "present")]
    return train_spec, tensors


def ray_train(train_spec: TrainSpec, folder: str, train_images: int) -> tuple[float, float, list[tuple[float, float]]]:
    """Ray Train on one worker: (median worker images/s over epochs 2.., end-to-end wall seconds, the training
    phases of epochs 2.. in time.time(), placed from the checkpoints' names)."""
    from lesion_ray import train
    from lesion_ray.settings import Settings

    start = time.perf_counter()
    train.run(train_spec, Settings.build())
    wall = time.perf_counter() - start
    run = f"{folder}/run"
    with open(f"{run}/metrics.json") as f:
        history = json.load(f)
    reports = sorted(datetime.strptime(name.removeprefix("checkpoint_"), "%Y-%m-%d_%H-%M-%S.%f").timestamp()
                     for name in os.listdir(run) if name.startswith("checkpoint_") and os.path.isdir(f"{run}/{name}"))
    windows = []
    for row, reported in zip(history[1:], reports[1:], strict=False):
        began = reported - row["epoch_time_s"]  # later than the true start by the checkpoint's save
        trained = train_images / row["train_images_per_s"]
        windows.append((began, began + trained - min(1.0, 0.25 * trained)))
    return statistics.median(row["train_images_per_s"] for row in history[1:]), wall, windows


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
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (both loops)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the plain loop's model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--plain-only", action="store_true", help="only the plain loop on random data (no Ray)")
    parser.add_argument("--goal", type=float, help="Ray Train / plain goal (default 0.95 on cuda, 0.9 on cpu)")
    parser.add_argument("--busy-goal", type=float, default=0.8, help="GPU busy share goal in steady state")
    add_result_args(parser, "train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = Results(args.results, args.step)
    on_gpu = args.device == "cuda"
    c = 1 if args.task == 1 else 5
    print(f"== bench_train: {args.architecture} task {args.task} {args.size}x{args.size} filters={args.filters} "
          f"batch={args.batch_size} threads={args.threads} {args.precision}"
          f"{' channels_last' if args.channels_last else ''}{' compile' if args.compile else ''} on {args.device} ==")
    busy = GpuBusy()
    if args.plain_only:
        images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, device=device)
        masks = (torch.rand(args.images, c, args.size, args.size, device=device) > 0.7).to(torch.uint8)
        present = masks.amax(dim=(2, 3)).float()
        with busy if on_gpu else contextlib.nullcontext():
            rate, windows = plain_loop(images, masks, present, args, device)
        line = f"  plain PyTorch : {rate:8.1f} images/s"
        if on_gpu:
            peak = torch.cuda.max_memory_allocated() / 2**30
            line += (f", GPU busy {100 * busy.share(windows):.0f}% of epochs 2.. ({busy.source}; "
                     f"{torch.cuda.get_device_name()}, peak memory {peak:.1f} GiB)")
        print(line)
        results.add(f"plain loop {args.precision} images/s", rate)
        return
    import ray

    with tempfile.TemporaryDirectory() as folder:
        train_spec, (images, masks, present) = prepare_run(args, folder)
        if on_gpu:  # the ceiling: the plain loop's data already on the GPU
            images, masks, present = images.to(device), masks.to(device), present.to(device)
        with busy if on_gpu else contextlib.nullcontext():
            before, plain_windows = plain_loop(images, masks, present, args, device)
            ray_rate, wall, ray_windows = ray_train(train_spec, folder, len(images))
            after, later_windows = plain_loop(images, masks, present, args, device)
        ray.shutdown()
    plain = (before + after) / 2
    print(f"  images        : {len(images)} training images, {args.epochs} epochs (median of epochs 2..)")
    print(f"  plain PyTorch : {plain:8.1f} images/s (runs: {before:.1f}, {after:.1f})")
    print(f"  Ray Train x1  : {ray_rate:8.1f} images/s (end to end incl. startup/preprocess/checkpoints: {wall:.0f} s)")
    goal = args.goal or (0.95 if on_gpu else 0.9)
    print(f"  ratio         : {ray_rate / plain:8.2f}x (goal >= {goal:.2f}x)")
    results.add(f"plain loop {args.precision} images/s", plain)
    results.add(f"Ray Train x1 {args.precision} images/s", ray_rate)
    results.at_least(f"Ray Train x1 / plain loop ({args.precision})", ray_rate / plain, goal, "x")
    if not on_gpu:
        results.skipped("GPU busy, Ray Train steady state", "no GPU")
        return
    ray_busy, plain_busy = busy.share(ray_windows), busy.share(plain_windows + later_windows)
    print(f"  GPU busy      : Ray Train {100 * ray_busy:.0f}% of its epochs 2..'s training phases "
          f"({len(ray_windows)} windows), plain loop {100 * plain_busy:.0f}%; {busy.source}, "
          f"{len(busy.samples)} samples")
    results.add("GPU busy, plain loop epochs 2..", plain_busy)
    results.at_least(f"GPU busy, Ray Train steady state ({busy.source})", ray_busy, args.busy_goal)


if __name__ == "__main__":
    main()
