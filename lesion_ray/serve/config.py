"""The serve spec, its bearer token and what counts as a loopback host."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lesion_ray import storage
from lesion_ray.inference import ModelRuntime
from lesion_ray.postprocess import Postprocess
from lesion_ray.preprocess import DEFAULT_MAX_PIXELS, LARGEST_MAX_PIXELS
from lesion_ray.registry import ModelRef
from lesion_ray.spec import EnvName, JobSpec, RegistryUri


class ServeSpec(ModelRuntime, JobSpec):
    kind: Literal["serve"] = "serve"
    model: ModelRef
    registry: RegistryUri | None = Field(None, description="registry URI (default: the cluster config's registry, "
                                                           "else runs/registry)")
    min_replicas: int = Field(1, ge=1, description="replicas of each deployment kept running")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound per deployment")
    target_ongoing_requests: float = Field(
        16.0, ge=0.1, description="autoscaling aims at this many requests per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once (>= max_batch_size)")
    max_batch_size: int = Field(16, ge=1, description="images in one forward pass (1 = no batching)")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="GPUs per model replica (e.g. 0.5: two replicas share "
                                                            "one); 0 runs the model on CPU")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="how long a batch waits to fill up")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger request bodies get 413")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=LARGEST_MAX_PIXELS,
                            description="larger images (decompression bombs) get 413")
    # 32 Mpx: 2.6x the largest ISIC 2018 image. Work on a decoded image peaks at ~25 bytes/pixel (RGB,
    # model input, float masks, overlay), so 4 decodes at the budget stay near 3 GiB per ingress replica.
    max_request_pixels: int = Field(
        32_000_000, ge=1, description="pixels of all images of one request, read from their headers; more gets 413 "
                                      "before anything is decoded")
    max_rows: int = Field(16, ge=1, description="rows of one /v1/predict request; more get 413")
    max_concurrent_decodes: int = Field(4, ge=1, description="threads per ingress replica that parse, decode and "
                                                             "encode request content; other requests wait for one")
    max_queued_requests: int = Field(64, ge=1, description="requests each HTTP proxy holds waiting for an ingress "
                                                          "replica; more get 503 at once")
    request_timeout_s: float = Field(60.0, ge=0.1, description="a request not answered within this time gets 408")
    auth_token_env: EnvName | None = Field(None, description="NAME of the variable holding the bearer token")
    auth_token_file: str | None = Field(None, description="file holding the bearer token (e.g. a mounted secret)")
    allow_unauthenticated: bool = Field(False, description="serve without a token on a non-loopback host")
    host: str = Field("127.0.0.1", description="HTTP listen address (0.0.0.0 for every interface: needs a token)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="which nodes run an HTTP proxy on host:port (HeadOnly: one entry point, e.g. when "
                                 "several nodes share one machine and so cannot all bind the port)")
    route_prefix: str = Field("/", description="URL path the API lives under")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="mask threshold (default: the model's own)")
    postprocess: Postprocess = Field(
        "largest_component", description="Task 1: largest_component keeps the largest region and fills its holes, "
                                         "as predict does; none keeps the mask as it is")
    poll_latest_s: float = Field(30.0, ge=0.0, description="name@latest: look for a new version this often (0: never)")

    @model_validator(mode="after")
    def _rules(self) -> ServeSpec:
        for key, broken, message in (
            ("max_replicas", self.max_replicas < self.min_replicas,
             f"must be at least min_replicas ({self.min_replicas})"),
            ("max_ongoing_requests", self.max_ongoing_requests < self.max_batch_size,
             f"must be at least max_batch_size ({self.max_batch_size}), or batches never fill"),
            ("route_prefix", not self.route_prefix.startswith("/"), f"must start with '/', got {self.route_prefix!r}"),
            ("auth_token_env", self.auth_token_env and self.auth_token_file,
             "give auth_token_env or auth_token_file, not both"),
            ("host", not (self.auth_token_env or self.auth_token_file or self.allow_unauthenticated
                          or is_loopback(self.host)),
             f"{self.host} accepts connections from other machines, so requests need a token: set "
             "auth_token_env or auth_token_file, or allow_unauthenticated: true to serve anyone"),
        ):
            if broken:
                raise PydanticCustomError("rule", message, {"key": key})
        return self


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` admits this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def read_token(spec: ServeSpec) -> bytes | None:
    """The bearer token from the environment variable or file the spec names (None: no auth)."""
    if spec.auth_token_env:
        token = os.environ.get(spec.auth_token_env, "").strip()
        if not token:
            raise RuntimeError(f"auth_token_env: the environment variable {spec.auth_token_env} is not set or empty; "
                               f"export {spec.auth_token_env}=<token> where the server runs (on an attached or "
                               "remote cluster: on every Ray node, before `ray start`), or use auth_token_file")
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
