"""The serve spec, its bearer token and what counts as a loopback host."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import Literal

from lesion_ray import registry, storage
from lesion_ray.inference import Postprocess
from lesion_ray.preprocess import DEFAULT_MAX_PIXELS
from lesion_ray.spec import CheckContext, JobSpec, RegistryUri, SpecError, check_uris, key_path, param

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(kw_only=True)
class ServeSpec(JobSpec):
    model: registry.ModelRef
    registry: RegistryUri | None = param(None, help="registry URI (default: the cluster config's registry, "
                                                     "else runs/registry)")
    min_replicas: int = param(1, min=1, help="replicas of each deployment kept running")
    max_replicas: int = param(2, min=1, help="autoscaling upper bound per deployment")
    target_ongoing_requests: float = param(16.0, min=0.1, help="autoscaling aims at this many requests per replica")
    max_ongoing_requests: int = param(64, min=1, help="requests a replica accepts at once (>= max_batch_size)")
    max_batch_size: int = param(16, min=1, help="images in one forward pass (1 = no batching)")
    batch_wait_timeout_s: float = param(0.01, min=0.0, help="how long a batch waits to fill up")
    max_upload_bytes: int = param(20 * 1024 * 1024, min=1, help="larger request bodies get 413")
    max_pixels: int = param(DEFAULT_MAX_PIXELS, min=1, help="larger images (decompression bombs) get 413")
    # 32 Mpx: 2.6x the largest ISIC 2018 image. Work on a decoded image peaks at ~25 bytes/pixel (RGB,
    # model input, float masks, overlay), so 4 decodes at the budget stay near 3 GiB per ingress replica.
    max_request_pixels: int = param(32_000_000, min=1,
                                    help="pixels of all images of one request, read from their headers; more gets "
                                         "413 before anything is decoded")
    max_rows: int = param(16, min=1, help="rows of one /v1/predict request; more get 413")
    max_concurrent_decodes: int = param(4, min=1, help="threads per ingress replica that parse, decode and encode "
                                                       "request content; other requests wait for one")
    max_queued_requests: int = param(64, min=1, help="requests each HTTP proxy holds waiting for an ingress replica; "
                                                     "more get 503 at once")
    request_timeout_s: float = param(60.0, min=0.1, help="a request not answered within this time gets 408")
    auth_token_env: str | None = param(None, help="NAME of the environment variable holding the bearer token")
    auth_token_file: str | None = param(None, help="file holding the bearer token (e.g. a mounted secret)")
    allow_unauthenticated: bool = param(False, help="serve without a token on a non-loopback host")
    host: str = param("127.0.0.1", help="HTTP listen address (0.0.0.0 for every interface: needs a token)")
    port: int = param(8000, min=1, max=65535, help="HTTP port")
    proxy_location: Literal["EveryNode", "HeadOnly"] = param(
        "EveryNode", help="which nodes run an HTTP proxy on host:port (HeadOnly: one entry point, e.g. when "
                          "several nodes share one machine and so cannot all bind the port)")
    route_prefix: str = param("/", help="URL path the API lives under")
    threshold: float | None = param(None, min=0.0, max=1.0, help="mask threshold (default: the model's own)")
    postprocess: Postprocess = param("largest_component", help="Task 1: largest_component keeps the largest "
                                     "region and fills its holes, as predict does; none keeps the mask as it is")
    poll_latest_s: float = param(30.0, min=0.0, help="name@latest: look for a new version this often (0: never)")

    def validate(self, source: str, path: str) -> None:
        if self.max_replicas < self.min_replicas:
            raise SpecError(source, key_path(path, "max_replicas"),
                            f"must be at least min_replicas ({self.min_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise SpecError(source, key_path(path, "max_ongoing_requests"),
                            f"must be at least max_batch_size ({self.max_batch_size}), or batches never fill")
        if not self.route_prefix.startswith("/"):
            raise SpecError(source, key_path(path, "route_prefix"),
                            f"must start with '/', got {self.route_prefix!r}")
        if self.auth_token_env and self.auth_token_file:
            raise SpecError(source, key_path(path, "auth_token_env"),
                            "give auth_token_env or auth_token_file, not both")
        if self.auth_token_env and not ENV_NAME.fullmatch(self.auth_token_env):
            raise SpecError(source, key_path(path, "auth_token_env"),
                            "must be the NAME of an environment variable holding the token (e.g. LESION_RAY_TOKEN), "
                            "never the token itself")
        if not (self.auth_token_env or self.auth_token_file or self.allow_unauthenticated or is_loopback(self.host)):
            raise SpecError(source, key_path(path, "host"),
                            f"{self.host} accepts connections from other machines, so requests need a token: set "
                            "auth_token_env or auth_token_file, or allow_unauthenticated: true to serve anyone")

    def check(self, ctx: CheckContext) -> None:
        # A ModelRef alone looks name@version up in the default registry; this spec may name another.
        check_uris(dataclasses.replace(self, model=registry.qualified(self.model, self.registry)), ctx)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` admits this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def read_token(spec: ServeSpec) -> bytes | None:
    """The bearer token from the environment variable or file the spec names (None: no auth)."""
    if spec.auth_token_env:
        token = os.environ.get(spec.auth_token_env, "").strip()
        if not token:
            raise RuntimeError(f"auth_token_env: the environment variable {spec.auth_token_env} is not set or empty; "
                               f"export {spec.auth_token_env}=<token> where the server runs")
        return token.encode()
    if spec.auth_token_file:
        try:
            token = storage.read_text(spec.auth_token_file).strip()
        except storage.StorageError as exc:
            raise RuntimeError(f"auth_token_file: {exc}") from None
        if not token:
            raise RuntimeError(f"auth_token_file {spec.auth_token_file} is empty: write the token into it")
        return token.encode()
    return None
