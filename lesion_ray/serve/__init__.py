"""Online prediction on Ray Serve (``kind: serve``): ``SegmentationApi`` (:mod:`.ingress`) in front of
``SegmentationModel`` (:mod:`.deployment`), so that bad input never reaches the model and each side scales on
its own work. Here: the application, its Serve config file and the run loop."""

import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve.context import _get_global_client  # the running HTTP options: no public API has them

from lesion_ray import report
from lesion_ray.serve.config import ServeSpec, read_token
from lesion_ray.serve.deployment import SegmentationModel
from lesion_ray.serve.ingress import SegmentationApi
from lesion_ray.settings import Settings
from lesion_ray.spec import RegistryUri, from_dict

SPEC = ServeSpec
__all__ = ["SPEC", "ServeSpec", "app_builder", "build_app", "run", "serve_config"]


def build_app(spec: ServeSpec, settings: Settings) -> serve.Application:
    """Ingress -> model, both autoscaled, their replicas on ``settings``' storage and registry."""
    spec = spec.model_copy(update={"registry": spec.registry or RegistryUri(settings.registry)})
    options = {
        "autoscaling_config": {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                               "target_ongoing_requests": spec.target_ongoing_requests},
        "max_ongoing_requests": spec.max_ongoing_requests,
    }
    model = SegmentationModel.options(
        **options, ray_actor_options={"num_cpus": 1, "num_gpus": spec.gpus_per_replica}).bind(spec, settings.storage)
    # Only the proxies' queue is bounded: the ingress sends the model up to max_ongoing_requests x max_rows
    # images, and a model queue limit would turn a burst of rows into 503s.
    return SegmentationApi.options(**options, max_queued_requests=spec.max_queued_requests).bind(
        spec, model, settings.storage)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for Serve config files (``lesion_ray.serve:app_builder``), the spec as ``args``."""
    spec = from_dict(ServeSpec, args, "serve config args")
    # No cluster config here: the spec's storage and registry, else the AWS variables and runs/registry.
    return build_app(spec, Settings.build(job=spec))


def serve_config(spec: ServeSpec) -> dict[str, Any]:
    """A Serve config file (``serve deploy``; KubeRay RayService ``serveConfigV2``) for this spec."""
    http_options = {"host": spec.host, "port": spec.port, "request_timeout_s": spec.request_timeout_s}
    app = {"name": spec.name, "route_prefix": spec.route_prefix, "import_path": "lesion_ray.serve:app_builder",
           "args": spec.model_dump(mode="json")}
    return {"proxy_location": spec.proxy_location, "http_options": http_options, "applications": [app]}


def run(spec: ServeSpec, settings: Settings, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until Ctrl-C, SIGTERM, ``stop`` or ``serve delete``; then delete the application, and shut Serve down
    unless other applications run on the cluster."""
    read_token(spec)  # fail now, not in every replica, when the token is missing
    serve.start(proxy_location=spec.proxy_location, http_options=serve_config(spec)["http_options"])
    # Serve has one HTTP server per cluster: where it already ran, serve.start kept its options and only logged it.
    # On another host the spec's loopback default (what lets it go without a token) would not hold.
    running = _get_global_client().http_config
    if (running.host, running.port) != (spec.host, spec.port):
        raise ValueError(f"Ray Serve already runs on this cluster at {running.host}:{running.port}, not {spec.host}:"
                         f"{spec.port}, and its HTTP server serves every application there: give the job that host "
                         "and port, or serve on a cluster without Serve")
    if running.request_timeout_s != spec.request_timeout_s:
        report.info(f"warning: the request timeout stays {running.request_timeout_s or 'none'} s, as the Serve "
                    f"running on this cluster has it (the job asks {spec.request_timeout_s:g} s)")
    serve.run(build_app(spec, settings), name=spec.name, route_prefix=spec.route_prefix)
    host = f"[{spec.host}]" if ":" in spec.host else spec.host  # an IPv6 address in a URL
    url = f"http://{host}:{spec.port}{spec.route_prefix.rstrip('/')}/"
    info = serve.get_deployment_handle("SegmentationModel", app_name=spec.name).info.remote().result()
    model = f"{info['name']}@{info['version']}"
    report.info(f"serving {model} at {url} (web page), {url}v1/segment, {url}v1/predict; Ctrl-C to stop")
    started = time.monotonic()
    stopped_by = _wait(spec.name, stop or threading.Event())
    if stopped_by != "application deleted":
        serve.delete(spec.name)
    if not serve.status().applications:  # an attached cluster's other applications stay up
        serve.shutdown()
    return {"url": url, "model": model, "stopped_by": stopped_by, "served_s": round(time.monotonic() - started, 1)}


def _wait(app_name: str, stop: threading.Event) -> str:
    """Block until a signal (main thread only), ``stop`` or the application is gone; say which."""
    reason = {"value": "stop requested"}

    def on_signal(signum: int, _frame: Any) -> None:
        reason["value"] = signal.Signals(signum).name
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            if app_name not in serve.status().applications:
                return "application deleted"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return reason["value"]
