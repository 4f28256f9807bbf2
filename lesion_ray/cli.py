"""The ``lesion-ray`` command.

    lesion-ray run JOB.yaml [--cluster CLUSTER.yaml] [dotted.key=value ...]
    lesion-ray validate JOB.yaml [--cluster CLUSTER.yaml] [dotted.key=value ...]
    lesion-ray jobs list|logs ID|stop ID --cluster CLUSTER.yaml
    lesion-ray render JOB.yaml --cluster cluster/kuberay.yaml [dotted.key=value ...]
    lesion-ray serve-config SERVE_JOB.yaml [dotted.key=value ...]   (for `serve deploy`)

Exit status: 0 done, 1 the job failed, 2 the spec or cluster config is wrong (nothing ran).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

import yaml

from lesion_ray import cluster, kuberay, manifest, report, spec, storage
from lesion_ray.cluster import ClusterConfig, RemoteError
from lesion_ray.settings import Settings
from lesion_ray.spec import CheckContext, JobSpec, SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_FILE = "lesion-ray.log"


def prepare(job_file: str, cluster_file: str | None,
            overrides: list[str]) -> tuple[JobSpec, ClusterConfig, Settings]:
    """Load the cluster config and the spec, build the job's settings (installing their storage part in this
    process), and check everything the spec names.

    Storage settings apply in order AWS variables < cluster config < spec.
    """
    config = cluster.load_cluster(cluster_file)
    storage.configure(Settings.build(config).storage)  # the spec (or a pipeline's step file) may lie on S3
    job = spec.load(job_file, overrides)
    job_settings = Settings.build(config, job)
    storage.configure(job_settings.storage)
    job.check(CheckContext(source=job_file, check_local_paths=config.kind == "local",
                           registry=job_settings.registry))
    return job, config, job_settings


def run_here(job: JobSpec, config: ClusterConfig, job_settings: Settings, verbose: bool = False) -> dict[str, Any]:
    """Run ``job`` in this process; Ray's logs go to ``runs/<job name>/lesion-ray.log``, which the
    summary names (when Ray was started here)."""
    log_file = os.path.join(job_settings.log_folder, job.name, LOG_FILE)
    logging_here = cluster.start_local(config, job_settings, log_file=log_file, verbose=verbose)
    summary = spec.job_module(job.kind, job.name).run(job, job_settings)
    return {**summary, "log": log_file} if logging_here else summary


def _cmd_validate(args: argparse.Namespace) -> int:
    job, config, _ = prepare(args.job, args.cluster, args.overrides)
    print(f"ok: {args.job}: {job.kind} '{job.name}' is valid for cluster '{config.name}' ({config.kind})")
    for step in getattr(job, "jobs", []):
        print(f"  - {step.kind} '{step.name}'")
    if config.kind != "local":
        print("  (local paths were not checked: they name the cluster's disks)")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    job, config, job_settings = prepare(args.job, args.cluster, args.overrides)
    if config.kind == "kuberay":
        command = " ".join(["lesion-ray render", args.job, "--cluster", args.cluster, *args.overrides]) \
            + " | kubectl apply -f -"
        raise SpecError(args.cluster, "kind", f"KubeRay jobs are applied with kubectl: {command}")
    if config.kind == "remote":
        return cluster.submit(job, config, job_settings, wait=not args.no_wait, verbose=args.verbose)
    started = time.monotonic()
    summary = run_here(job, config, job_settings, verbose=args.verbose)
    title = f"{job.kind} '{job.name}' finished in {time.monotonic() - started:.1f}s"
    print(report.format_summary(title, summary), flush=True)
    return EXIT_OK


def _cmd_render(args: argparse.Namespace) -> int:
    job, config, job_settings = prepare(args.job, args.cluster, args.overrides)
    if config.kind != "kuberay":
        raise SpecError(args.cluster, "kind", "`lesion-ray render` needs a kuberay cluster config (kind: kuberay)")
    print(yaml.safe_dump_all(kuberay.render(job, config, job_settings), sort_keys=False), end="")
    return EXIT_OK


def _cmd_serve_config(args: argparse.Namespace) -> int:
    job = spec.load(args.job, args.overrides)
    if job.kind != "serve":
        raise SpecError(args.job, "kind", f"`lesion-ray serve-config` needs a serve spec, got kind '{job.kind}'")
    from lesion_ray import serve

    print(yaml.safe_dump(serve.serve_config(job), sort_keys=False), end="")
    return EXIT_OK


def _cmd_jobs(args: argparse.Namespace) -> int:
    config = cluster.load_cluster(args.cluster)
    if config.kind != "remote":
        raise SpecError(args.cluster, "kind",
                        "`lesion-ray jobs` needs a remote cluster config (kind: remote)")
    if args.action == "list":
        rows = cluster.list_jobs(config)
        for row in rows:
            print(f"{row['id']:<48} {row['status']:<10} {row['kind']:<9} {row['name']:<24} {row['started']}")
        print(f"{len(rows)} job(s) on {config.address}")
    elif args.action == "logs":
        print(cluster.job_logs(config, _job_id(args)), end="")
    elif args.action == "stop":
        stopped = cluster.stop_job(config, _job_id(args))
        print(f"{_job_id(args)}: {'stop requested' if stopped else 'already finished'}")
    return EXIT_OK


def _cmd_manifest(args: argparse.Namespace) -> int:
    print(report.format_summary("manifest", manifest.merge(args.outputs, args.to)), flush=True)
    return EXIT_OK


def _job_id(args: argparse.Namespace) -> str:
    if not args.job_id:
        raise SpecError("command line", "job_id", f"`lesion-ray jobs {args.action}` needs a job id (see `jobs list`)")
    return args.job_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesion-ray", description="Skin-lesion segmentation at archive scale on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("run", _cmd_run, "run a job spec"),
                             ("validate", _cmd_validate, "check a job spec without running it")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job", help="job spec YAML (see jobs/)")
        sub.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. epochs=3")
        sub.add_argument("--cluster", help=f"cluster config YAML (default: {cluster.DEFAULT_CLUSTER_FILE})")
        if name == "run":
            sub.add_argument("--no-wait", action="store_true", help="remote: submit and return")
            sub.add_argument("--verbose", action="store_true",
                             help="show Ray's logs and its workers' output on the console too "
                                  f"(they always go to runs/<job name>/{LOG_FILE})")
        sub.set_defaults(func=func)
    render = commands.add_parser("render", help="print KubeRay manifests (RayJob / RayService) for a job spec")
    render.add_argument("job", help="job spec YAML")
    render.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    render.add_argument("--cluster", required=True, help="kuberay cluster config, e.g. cluster/kuberay.yaml")
    render.set_defaults(func=_cmd_render)
    export = commands.add_parser("serve-config", help="print a serve spec as a Serve config file (serve deploy)")
    export.add_argument("job", help="serve job spec YAML")
    export.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    export.set_defaults(func=_cmd_serve_config)
    merge = commands.add_parser("manifest", help="combine the manifests of several predict outputs (the shards "
                                                 "of one archive) into one")
    merge.add_argument("outputs", nargs="+", help="predict output folders or URIs")
    merge.add_argument("--to", required=True, help="where manifest.parquet and skipped.csv go")
    merge.set_defaults(func=_cmd_manifest)
    jobs = commands.add_parser("jobs", help="list, show logs of, or stop jobs on a remote cluster")
    jobs.add_argument("action", choices=["list", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--cluster", required=True, help="remote cluster config YAML")
    jobs.set_defaults(func=_cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --cluster: collect the strays that look like key=value.
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RemoteError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, RuntimeError) as exc:  # failures the job explained itself
        if os.environ.get("LESION_RAY_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}\n(set LESION_RAY_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure: keep the trace for a report
        traceback.print_exc()
        print(f"error: the job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
