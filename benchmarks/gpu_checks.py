"""The GPU suite's checks that are not throughput benchmarks (``benchmarks/gpu_suite.sh`` runs them).

    python benchmarks/gpu_checks.py env [--expect-gpu]       # nvidia-smi, versions; ray.init() sees the GPU
    python benchmarks/gpu_checks.py train --work DIR         # fp16 + GradScaler, GPU checkpoint on a CPU,
                                                             # NCCL, two workers (NCCL with 2 GPUs, else gloo)
    python benchmarks/gpu_checks.py quality --pipeline-root DIR [--logs DIR]   # section 5's scores
    python benchmarks/gpu_checks.py table FILE               # the suite's closing table

Every check appends its result rows (step, metric, value, goal, met) to ``--results`` when given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import torch
from common import Results, add_result_args, image_folder  # benchmarks/common.py, on sys.path as the script's folder

# --- env -----------------------------------------------------------------------------------------------------


def check_env(args: argparse.Namespace) -> int:
    """Print the machine, the GPU and the versions; start Ray the plain way and run a GPU task on it. Exit 1, with
    what failed, when Ray does not start or (``--expect-gpu``) does not see the GPU."""
    results = Results(args.results, args.step)
    smi = shutil.which("nvidia-smi")
    print(subprocess.run([smi], capture_output=True, text=True).stdout if smi else "nvidia-smi: not on PATH")
    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
              f"{props.major}.{props.minor}, {torch.cuda.device_count()} device(s); bf16 supported: "
              f"{torch.cuda.is_bf16_supported()}")
    for name in ("torchvision", "ray", "pyarrow", "numpy", "PIL", "pydantic", "fastapi", "python_multipart",
                 "pynvml", "httpx", "pytest"):
        try:
            module = importlib.import_module(name)
            print(f"  {name:<17} {getattr(module, '__version__', 'installed')}")
        except Exception as exc:  # a broken install says how
            print(f"  {name:<17} MISSING ({type(exc).__name__}: {exc})")
    results.add("GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)")
    failed = []
    try:
        import ray

        context = ray.init()  # as the issue asks: plain (lesion-ray's embedded Ray also starts the dashboard)
        gpus = ray.cluster_resources().get("GPU", 0)
        print(f"ray.init(): Ray {ray.__version__} started: {ray.cluster_resources()}; dashboard: "
              f"{context.dashboard_url or 'not started'}")
        results.add("ray.init() starts", "yes", "starts", True)
        if gpus:
            seen = ray.get(ray.remote(num_gpus=1)(_gpu_task).remote(), timeout=180)
            print(f"a Ray task with num_gpus=1: {seen}")
            results.add("Ray GPUs / task sees", f"{gpus:g} / {seen['device']}", ">= 1 GPU", bool(seen["cuda"]))
            if not seen["cuda"]:
                failed.append(f"a Ray task holding a GPU sees no CUDA device ({seen})")
        else:
            results.add("Ray GPUs", 0, ">= 1 GPU" if args.expect_gpu else "", False if args.expect_gpu else None)
            if args.expect_gpu:
                failed.append(f"ray.init() started but its resources have no GPU: {ray.cluster_resources()} "
                              f"(torch sees {torch.cuda.device_count()} device(s), CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        import ray.data  # noqa: F401  # what the jobs need besides the core
        import ray.serve  # noqa: F401
        import ray.train.torch  # noqa: F401

        ray.shutdown()
    except Exception as exc:
        traceback.print_exc()
        failed.append(f"Ray: {type(exc).__name__}: {exc}")
        results.add("ray.init() starts", f"no: {type(exc).__name__}", "starts", False)
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0


def _gpu_task() -> dict[str, Any]:
    return {"cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else "none", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


# --- train ---------------------------------------------------------------------------------------------------


def _train_spec(data: str, folder: str, name: str, **keys: Any) -> Any:
    from lesion_ray import spec, train

    raw = {"kind": "train", "name": name, "data": data, "output": f"{folder}/{name}", "registry": f"{folder}/registry",
           "model": {"architecture": "unet", "task": 1, "input_size": 64, "num_filters": 8, "depth": 3},
           "loss": {"name": "seed"}, "epochs": 2, "batch_size": 8, "num_workers": 1, "val_fraction": 0.25,
           "model_name": name, "mlflow": {"enabled": False}, "tensorboard": False}
    return spec.from_dict(train.TrainSpec, raw | keys, "gpu_checks")


def _train(results: Results, metric: str, spec: Any) -> dict[str, Any] | None:
    """``train.run(spec)``; a row saying whether it ran with finite losses; its summary (None if it failed)."""
    from lesion_ray import train
    from lesion_ray.settings import Settings

    start = time.perf_counter()
    try:
        summary = train.run(spec, Settings.build())
    except Exception as exc:
        traceback.print_exc()
        results.add(metric, f"failed: {type(exc).__name__}: {str(exc)[:120]}", "runs", False)
        return None
    with open(os.path.join(summary["output"], "metrics.json")) as f:
        history = json.load(f)
    finite = all(math.isfinite(row[k]) for row in history for k in ("train_loss", "val_loss"))
    losses = ", ".join(f"{row['train_loss']:.3f}" for row in history)
    results.add(metric, f"ran {len(history)} epochs in {time.perf_counter() - start:.0f} s, train loss {losses}",
                "finite losses", finite)
    return summary


def _cpu_forward(model_dir: str, checkpoint_dir: str, x_file: str, out_file: str) -> subprocess.CompletedProcess:
    """In a fresh process that sees no GPU at all (CUDA_VISIBLE_DEVICES empty): load the model folder and the
    checkpoint's train state, run the model on the saved input, save the mask probabilities."""
    code = f"""
import torch
from lesion_ray import registry, train
assert not torch.cuda.is_available()
loaded = registry.load_model({model_dir!r}, device="cpu")
state = train.read_train_state({checkpoint_dir!r})
tensors = [v for group in state["optimizer"]["state"].values() for v in group.values() if torch.is_tensor(v)]
assert tensors and all(t.device.type == "cpu" for t in tensors), "optimizer state not on the CPU"
with torch.inference_mode():
    torch.save(torch.sigmoid(loaded.model(torch.load({x_file!r}))[0]), {out_file!r})
print(f"loaded on CPU: {{loaded.name}}@{{loaded.version}}, epoch {{state['epoch']}}, {{len(tensors)}} optimizer "
      "tensors")
"""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def check_checkpoint_on_cpu(results: Results, summary: dict[str, Any], device: str, folder: str) -> None:
    """The training's best model and its latest Ray Train checkpoint (saved by a worker on ``device``) load in a
    process without a GPU, and give the probabilities the model gives on ``device`` (fp32), within 1e-3."""
    from lesion_ray import registry

    output = summary["output"]
    checkpoints = sorted(d for d in os.listdir(output)
                         if d.startswith("checkpoint_") and os.path.isdir(os.path.join(output, d)))
    if not checkpoints:
        results.add("checkpoint loaded with no GPU", f"no checkpoint_* folder in {output}", "loads", False)
        return
    loaded = registry.load_model(summary["model"], summary["registry"], device=device)
    size = loaded.config.input_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch.sigmoid(loaded.model(x.to(device))[0]).cpu()
    x_file, out_file = f"{folder}/x.pt", f"{folder}/cpu_probs.pt"
    torch.save(x, x_file)
    done = _cpu_forward(registry.resolve(summary["model"], summary["registry"]).model_dir,
                        os.path.join(output, checkpoints[-1]), x_file, out_file)
    print(done.stdout + done.stderr[-3000:])
    metric = f"checkpoint saved on {'the GPU' if device == 'cuda' else 'CPU (smoke)'}, loaded with no GPU"
    if done.returncode:
        results.add(metric, f"failed: {done.stderr.strip()[-200:]}", "loads", False)
        return
    diff = float((torch.load(out_file) - expected).abs().max())
    results.add(f"{metric}: max |p_cpu - p_{device}|", diff, "<= 0.001", diff <= 1e-3)


def _nccl_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    device = ray.train.torch.get_device()
    value = torch.ones(1, device=device) * (ray.train.get_context().get_world_rank() + 1)
    dist.all_reduce(value)
    ray.train.report({"backend": dist.get_backend(), "sum": float(value.item()), "device": str(device)})


def check_nccl(results: Results, workers: int, folder: str) -> None:
    """A Ray Train worker group on GPUs initialises torch.distributed with NCCL and all-reduces on the GPU."""
    import ray.train
    import ray.train.torch

    trainer = ray.train.torch.TorchTrainer(
        _nccl_loop, scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=True),
        run_config=ray.train.RunConfig(name="nccl", storage_path=folder))
    try:
        metrics = trainer.fit().metrics
    except Exception as exc:
        traceback.print_exc()
        results.add(f"NCCL init, {workers} worker(s)", f"failed: {type(exc).__name__}: {str(exc)[:150]}", "nccl",
                    False)
        return
    expected = workers * (workers + 1) / 2
    ok = metrics.get("backend") == "nccl" and metrics.get("sum") == expected
    results.add(f"NCCL init + all_reduce, {workers} worker(s)", f"{metrics.get('backend')} on {metrics.get('device')}, "
                f"sum {metrics.get('sum')}", f"nccl, sum {expected:g}", ok)


def check_train(args: argparse.Namespace) -> int:
    """fp16 with the GradScaler on the GPU; that GPU-saved checkpoint on a CPU; NCCL; two workers."""
    import ray

    results = Results(args.results, args.step)
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    folder = tempfile.mkdtemp(prefix="train-checks-", dir=args.work)
    ray.init(num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from lesion_ray.settings import Settings

    data = f"{folder}/isic"
    image_folder(data, args.images, Settings.build(), width=(96, 128))
    if gpus:
        summary = _train(results, "fp16 + GradScaler on the GPU",
                         _train_spec(data, folder, "fp16", use_gpu=True, precision="fp16"))
    else:
        results.skipped("fp16 + GradScaler on the GPU", "no GPU (fp16 needs use_gpu)")
        summary = None
    two = dict(num_workers=2, use_gpu=gpus >= 2)
    if gpus >= 2:
        print("two GPUs: the two-worker training runs on them with NCCL")
        workers = _train(results, "two workers, NCCL on 2 GPUs", _train_spec(data, folder, "two", **two))
    else:
        print(f"{gpus} GPU(s): two workers with NCCL need two GPUs (NCCL refuses two ranks on one device), so the "
              "two-worker path is checked with gloo on CPU workers")
        workers = _train(results, "two workers, gloo on CPU (fewer than 2 GPUs)",
                         _train_spec(data, folder, "two", **two))
    if gpus:
        check_nccl(results, min(gpus, 2), folder)
    else:
        results.skipped("NCCL init", "no GPU")
    if summary or workers:
        check_checkpoint_on_cpu(results, summary or workers, device if summary else "cpu", folder)
    ray.shutdown()
    return 0


# --- quality -------------------------------------------------------------------------------------------------


def check_quality(args: argparse.Namespace) -> int:
    """Section 5: pooled and per-attribute Jaccard of the quality pipeline's evaluation, its training's epochs
    and best validation score; its curves and reports copied into ``--logs``."""
    results = Results(args.results, args.step)
    root = args.pipeline_root
    with open(f"{root}/evaluation/report.json") as f:
        scores = json.load(f)["scores"]
    with open(f"{root}/train/metrics.json") as f:
        history = json.load(f)
    best = max(history, key=lambda row: row["val_score"])
    results.add("epochs trained (s each, median)", f"{len(history)} "
                f"({sorted(r['epoch_time_s'] for r in history)[len(history) // 2]:.1f} s)")
    results.add("highest val pooled Jaccard in metrics.json", f"{best['val_score']:.4f} (epoch {best['epoch']})")
    results.at_least("pooled Jaccard, validation images", scores["jaccard"], args.goal)
    for name, value in scores["per_attribute"].items():
        results.add(f"  Jaccard {name}", value["jaccard"])
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
        for source, name in (("train/metrics.csv", "train-metrics.csv"), ("train/training.png", "training.png"),
                             ("train/report.html", "train-report.html"), ("evaluation/report.json", "evaluation.json"),
                             ("evaluation/report.html", "evaluation-report.html")):
            if os.path.exists(f"{root}/{source}"):
                shutil.copy(f"{root}/{source}", f"{args.logs}/{name}")
    return 0


# --- table ---------------------------------------------------------------------------------------------------


def print_table(args: argparse.Namespace) -> int:
    """The suite's rows as an aligned table, by step in the order the steps ran, each step's status first."""
    if not os.path.exists(args.file):
        print(f"no results in {args.file}")
        return 1
    with open(args.file) as f:
        header, *rows = [(line.rstrip("\n").split("\t") + [""] * 5)[:5] for line in f if line.strip()]
    steps = list(dict.fromkeys(r[0] for r in rows))
    rows = sorted(rows, key=lambda r: (steps.index(r[0]), r[1] != "step"))  # stable: the rest as written
    widths = [min(max(len(r[i]) for r in [header, *rows]), limit) for i, limit in enumerate((14, 64, 60, 22, 4))]
    for row in [header, *rows]:
        cells = [cell if len(cell) <= w else cell[: w - 1] + "~" for cell, w in zip(row, widths, strict=True)]
        print("  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip())
    missed = [f"{r[0]}: {r[1]}" for r in rows if r[4] == "NO"]
    print(f"{len(rows)} rows; not met: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, nvidia-smi, ray.init() on the GPU")
    env.add_argument("--expect-gpu", action="store_true", help="fail when Ray sees no GPU")
    add_result_args(env, "env")
    train = sub.add_parser("train", help="fp16, checkpoint on CPU, NCCL, two workers")
    train.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    train.add_argument("--images", type=int, default=48)
    add_result_args(train, "train-checks")
    quality = sub.add_parser("quality", help="section 5's scores from the quality pipeline's outputs")
    quality.add_argument("--pipeline-root", required=True, help="the folder holding train/ and evaluation/")
    quality.add_argument("--logs", help="copy the curves and reports here")
    quality.add_argument("--goal", type=float, default=0.45, help="pooled Jaccard goal (default 0.45)")
    add_result_args(quality, "quality")
    table = sub.add_parser("table", help="print the results TSV as a table")
    table.add_argument("file")
    args = parser.parse_args()
    if getattr(args, "work", None):
        os.makedirs(args.work, exist_ok=True)
    return {"env": check_env, "train": check_train, "quality": check_quality, "table": print_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
