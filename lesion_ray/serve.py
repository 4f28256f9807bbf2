"""Online prediction on Ray Serve (``kind: serve``): a registered model behind an HTTP API.

Two deployments, so that bad input never reaches the model and each side scales on its own work:

- ``SegmentationApi`` (FastAPI ingress): bearer-token check, request budgets (body bytes, rows,
  pixels counted from the image headers before anything is decoded, multipart parts), decoding
  and validation (decompression bombs included) in a small pool of threads per replica, resizing
  to the model input, and turning the model's probabilities into PNG masks at the original size,
  JSON or an overlay.
- ``SegmentationModel``: holds the model and answers one request per image; ``@serve.batch``
  groups the images of all clients into one forward pass. It follows ``name@latest``: every
  ``poll_latest_s`` it looks at the registry's latest.json and, when a new version appears,
  loads and checks it beside the current one and swaps it in one assignment, so no request is
  refused. ``check_health`` fails when the model's forward pass raises or gives NaN/inf.

Endpoints (under ``route_prefix``): ``POST /v1/segment`` (raw bytes or multipart ``file`` ->
``image/png`` mask; ``?format=json``; ``?overlay=true`` -> JPEG overlay), ``POST /v1/predict``
(the tutorial's ``{"rows": [{"image": "data:image/png;base64,..."}]}``), ``GET /v1/model``,
``GET /healthz`` and ``GET /`` (a web page). Errors are JSON ``{"error": "..."}``; Serve's proxies
answer 503 when ``max_queued_requests`` requests already wait and 408 after ``request_timeout_s``.
"""

# No `from __future__ import annotations`: FastAPI must see the real types of the ingress methods.
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.message
import email.parser
import email.policy
import hashlib
import hmac
import importlib.resources
import io
import ipaddress
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lesion_ray import inference, registry, report, storage
from lesion_ray.data import ATTRIBUTES
from lesion_ray.inference import Postprocess, mask_png, tint, to_masks
from lesion_ray.preprocess import DEFAULT_MAX_PIXELS, BadImage, decode_image, open_image, to_model_input
from lesion_ray.registry import LoadedModel, ModelRef
from lesion_ray.settings import Settings
from lesion_ray.spec import (
    CheckContext,
    JobSpec,
    RegistryUri,
    SpecError,
    check_uris,
    from_dict,
    key_path,
    param,
    to_dict,
)

logger = logging.getLogger("ray.serve")

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^;,]*)*?;base64,(?P<data>.*)$", re.DOTALL)
DATA_URI_TYPES = ("image/png", "image/jpeg", "image/jpg")
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# The upload form needs one part; a bound keeps a crafted body of thousands of parts cheap to refuse.
MAX_FORM_PARTS = 16
MAX_PART_HEADER_BYTES = 16 * 1024
T = TypeVar("T")


@dataclass(kw_only=True)
class ServeSpec(JobSpec):
    model: ModelRef
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


SPEC = ServeSpec


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` admits this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


class ApiError(Exception):
    """A client's mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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


def labels(task: int) -> tuple[str, ...]:
    return ("lesion",) if task == 1 else ATTRIBUTES


# --- The work of one request, as plain functions (replicas, benchmark and tests share them) -------


@dataclass
class Prediction:
    """The model's answer for one image at the model's input size."""

    probs: np.ndarray          # float16 [C, S, S] mask probabilities
    scores: list[float]        # [C] head-1 probabilities ("lesion" / attribute present)
    threshold: float
    name: str
    version: str
    task: int
    input_size: int
    postprocess: Postprocess = "largest_component"


@contextlib.contextmanager
def client_errors(what: str) -> Iterator[None]:
    """Turn a failure to read or decode the image ``what`` into the client error it is (413, 415, 422)."""
    try:
        yield
    except BadImage as exc:
        if exc.reason.startswith("decompression bomb"):
            raise ApiError(413, f"{what} is too large to decode ({exc.reason}); send a smaller image") from None
        if exc.reason == "not an image":
            raise ApiError(415, f"{what} is not an image: send PNG or JPEG bytes") from None
        raise ApiError(422, f"{what} cannot be decoded ({exc.reason}): send a complete PNG or JPEG") from None
    except OSError as exc:  # PIL's error for damaged data that a decoder step met outside BadImage's checks
        raise ApiError(422, f"{what} cannot be decoded ({exc}): send a complete PNG or JPEG") from None


def check_pixels(images: list[tuple[bytes, str]], max_pixels: int, max_request_pixels: int) -> None:
    """413 when one image is over ``max_pixels`` or all of them are over ``max_request_pixels``
    together, from their headers alone: nothing is decoded. ``images``: (bytes, what it is)."""
    total = 0
    for data, what in images:
        with client_errors(what):
            width, height = open_image(data, max_pixels).size
        total += width * height
    if total > max_request_pixels:
        raise ApiError(413, f"the request's images have {total:,} pixels, more than max_request_pixels="
                            f"{max_request_pixels:,}: send fewer or smaller images")


def prepare(data: bytes, max_pixels: int, size: int, what: str = "the upload") -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (model input float32 [3, size, size], (orig_height, orig_width)).

    Every decoding failure becomes an :class:`ApiError` naming ``what`` was wrong.
    """
    with client_errors(what):
        image, orig = decode_image(data, max_pixels=max_pixels, target=size)
    return to_model_input([image], size)[0].numpy(), orig


def check_model(loaded: LoadedModel) -> None:
    """Raise when a forward pass on a tiny input fails or gives NaN/inf (broken weights)."""
    side = loaded.config.downsampling
    with torch.inference_mode():
        outputs = loaded.model(torch.full((1, 3, side, side), 0.5))
    if not all(torch.isfinite(o).all() for o in outputs):
        raise RuntimeError(f"model {loaded.name}@{loaded.version} gives NaN/inf outputs: its weights are broken")


def forward(loaded: LoadedModel, inputs: list[np.ndarray], threshold: float | None = None,
            postprocess: Postprocess = "largest_component") -> list[Prediction]:
    """One forward pass over a batch of :func:`prepare` outputs."""
    size = loaded.config.input_size
    x = torch.from_numpy(np.stack(inputs))
    if x.shape[-1] != size:  # prepared for the previous version's input size, just before a swap
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    probs, head1, _ = inference.forward(loaded.model, x)
    probs, scores = probs.to(torch.float16).numpy(), head1.tolist()
    cut = loaded.threshold if threshold is None else threshold
    return [Prediction(probs[i], scores[i], cut, loaded.name, loaded.version, loaded.config.task, size, postprocess)
            for i in range(len(inputs))]


def masks_at(pred: Prediction, orig: tuple[int, int]) -> np.ndarray:
    """bool [C, H, W]: probabilities resized to the original size, thresholded and post-processed, as predict does."""
    return to_masks(pred.probs, *orig, pred.threshold, pred.postprocess)


def union_png(pred: Prediction, orig: tuple[int, int]) -> bytes:
    """The lesion mask (Task 2: any attribute) at the original size, as PNG."""
    return mask_png(masks_at(pred, orig).any(0))


def overlay_image(data: bytes, pred: Prediction, orig: tuple[int, int], max_pixels: int) -> bytes:
    """The image with each mask channel tinted in its colour, as a JPEG (it is a photograph).

    The image is decoded again here rather than kept at full size while the model works.
    """
    with client_errors("the upload"):
        image, _ = decode_image(data, max_pixels=max_pixels)
    buf = io.BytesIO()
    Image.fromarray(tint(image, masks_at(pred, orig))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def segment_json(pred: Prediction, orig: tuple[int, int]) -> dict[str, Any]:
    masks = masks_at(pred, orig)
    union = masks.any(0)
    body: dict[str, Any] = {
        "model": {"name": pred.name, "version": pred.version},
        "height": int(union.shape[0]),
        "width": int(union.shape[1]),
        "threshold": pred.threshold,
        "mask": base64.b64encode(mask_png(union)).decode(),
        "lesion_area_fraction": float(union.mean()),
        "attributes": dict(zip(labels(pred.task), pred.scores, strict=True)),
    }
    if pred.task == 2:
        body["attribute_masks"] = {a: base64.b64encode(mask_png(m)).decode()
                                   for a, m in zip(ATTRIBUTES, masks, strict=True)}
    return body


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The ``file`` field (or the first part with a file name) of a multipart/form-data body.

    The body is cut at its boundary in C (count, then split): email.parser, which parses line by
    line, takes minutes and gigabytes on a crafted 20 MB body of tiny parts or lines.
    """
    boundary = _headers(b"Content-Type: " + content_type.encode("latin-1")).get_boundary()
    delimiter = b"--" + boundary.encode("latin-1") if boundary else b""
    delimiters = body.count(delimiter) if delimiter else 0
    if not delimiters:
        raise ApiError(400, "malformed multipart/form-data body: it needs a boundary and at least one part")
    if delimiters > MAX_FORM_PARTS + 1:  # the closing delimiter ends the last part
        raise ApiError(413, f"the multipart form has more than {MAX_FORM_PARTS} parts: send the image in a "
                            "single field named 'file'")
    # After each delimiter: optional padding, CRLF, headers, a blank line, the content, CRLF; "--" closes.
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        end = part.find(b"\r\n\r\n", 0, MAX_PART_HEADER_BYTES)
        if end < 0:
            raise ApiError(400, "malformed multipart/form-data part: its headers need to end with a blank line "
                                f"within {MAX_PART_HEADER_BYTES:,} bytes")
        headers = _headers(part[:end].strip())
        if headers.get_param("name", header="content-disposition") == "file" or headers.get_filename():
            return part[end + 4:].removesuffix(b"\r\n")
    raise ApiError(422, "the multipart form has no file: send the image in a form field named 'file'")


def _headers(block: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(block)


def upload_image(body: bytes, content_type: str, max_pixels: int, max_request_pixels: int) -> bytes:
    """The image of a /v1/segment body (raw bytes or a multipart ``file``), checked against the pixel budgets."""
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        body = multipart_file(body, content_type)
    elif not (media.startswith("image/") or media == "application/octet-stream"):
        raise ApiError(415, f"Content-Type {media} is not supported here: send image bytes (image/jpeg, "
                            "image/png) or a multipart form with a 'file' field; JSON goes to /v1/predict")
    check_pixels([(body, "the upload")], max_pixels, max_request_pixels)
    return body


def predict_images(body: bytes, max_rows: int, max_pixels: int, max_request_pixels: int) -> list[tuple[bytes, str]]:
    """The images of a /v1/predict body with what each is (``rows[i].image``), checked against the budgets."""
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise ApiError(400, f"the body is not valid JSON ({exc}): send {{\"rows\": [{{\"image\": "
                            "\"data:image/png;base64,...\"}]}") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply: send {\"rows\": [{\"image\": "
                            "\"data:image/png;base64,...\"}]}") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if isinstance(rows, list) and len(rows) > max_rows:
        raise ApiError(413, f"{len(rows):,} rows, more than max_rows={max_rows}: send them in several requests")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ApiError(422, "expected {\"rows\": [{\"image\": \"data:image/png;base64,...\"}, ...]} "
                            "with at least one row")
    wheres = [f"rows[{i}].image" for i in range(len(rows))]
    images = [(data_uri_bytes(row.get("image"), where), where) for row, where in zip(rows, wheres, strict=True)]
    check_pixels(images, max_pixels, max_request_pixels)
    return images


def data_uri_bytes(uri: Any, where: str) -> bytes:
    if not isinstance(uri, str):
        raise ApiError(422, f"{where} must be a data URI string like 'data:image/png;base64,...'")
    match = DATA_URI.match(uri)
    if not match:
        raise ApiError(422, f"{where} is not a base64 data URI: expected 'data:image/png;base64,...'")
    if match["mime"].lower() not in DATA_URI_TYPES:
        raise ApiError(415, f"{where} has type {match['mime']}: send image/png or image/jpeg")
    try:
        return base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{where} holds invalid base64 data") from None


# --- Deployments -------------------------------------------------------------------------


def _pinned(ref: str, version: str) -> str:
    return ref.removesuffix("@latest") + f"@{version}"


@serve.deployment(ray_actor_options={"num_cpus": 1})
class SegmentationModel:
    """Holds the model; batches the images of all clients into one forward pass."""

    async def __init__(self, spec: ServeSpec, storage_config: storage.S3Config) -> None:
        storage.configure(storage_config)  # also where no driver's setup hook reaches (serve deploy, RayService)
        self.spec = spec
        self.batches = self.images = 0  # this replica's forward passes and the images in them
        self.refused: dict[str, str] | None = None  # the newest version that could not be served, and why
        self.loaded = await asyncio.to_thread(self._load, spec.model)
        self.predict.set_max_batch_size(spec.max_batch_size)
        self.predict.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        follow = spec.model.endswith("@latest") and spec.poll_latest_s > 0
        self._follower = asyncio.create_task(self._follow_latest()) if follow else None

    def _load(self, ref: str) -> LoadedModel:
        loaded = registry.load_model(ref, self.spec.registry)
        check_model(loaded)
        logger.info(f"loaded model {loaded.name}@{loaded.version} from {loaded.uri}")
        return loaded

    async def _follow_latest(self) -> None:
        while True:
            await asyncio.sleep(self.spec.poll_latest_s)
            current = f"{self.loaded.name}@{self.loaded.version}"
            try:
                version = (await asyncio.to_thread(registry.resolve, self.spec.model, self.spec.registry)).version
            except Exception as exc:  # storage hiccups: look again at the next poll
                logger.warning(f"staying on {current}: cannot read the registry: {type(exc).__name__}: {exc}")
                continue
            if version == self.loaded.version or (self.refused and version == self.refused["version"]):
                continue  # a version that failed to load or check is not tried again
            try:
                # Loaded and checked beside the current model while requests keep flowing; then one assignment.
                self.loaded = await asyncio.to_thread(self._load, _pinned(self.spec.model, version))
                self.refused = None  # a good newer version replaces any refused one
            except Exception as exc:  # broken weights, a config that does not fit, an unreadable file
                self.refused = {"version": version, "reason": str(exc)[:500]}
                logger.warning(f"staying on {current}: version {version} cannot be served: {exc}")

    @serve.batch
    async def predict(self, inputs: list[np.ndarray]) -> list[Prediction]:
        loaded = self.loaded  # one model for the whole batch, even if a swap lands meanwhile
        self.batches += 1
        self.images += len(inputs)
        return await asyncio.to_thread(forward, loaded, inputs, self.spec.threshold, self.spec.postprocess)

    def info(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "name": loaded.name, "version": loaded.version, "task": loaded.config.task,
            "architecture": loaded.config.architecture, "input_size": loaded.config.input_size,
            "threshold": loaded.threshold if self.spec.threshold is None else self.spec.threshold,
            "postprocess": self.spec.postprocess,
            "labels": list(labels(loaded.config.task)), "metrics": loaded.metrics, "refused_version": self.refused,
            "replica": {"batches": self.batches, "images": self.images},
        }

    def check_health(self) -> None:
        check_model(self.loaded)


class DecodePool:
    """``size`` threads for the work whose memory grows with a request's content (JSON, multipart,
    decoding, masks at the original size). Unlike a semaphore around ``asyncio.to_thread``, a
    request cancelled mid-decode (client gone, timeout) keeps its thread until the decode ends,
    so the cap holds under cancellations too."""

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="decode")
        self._lock = threading.Lock()
        self._running = self.peak = 0  # peak: the most at once, reported by /v1/model

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._counted, fn, args)

    def _counted(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            self._running += 1
            self.peak = max(self.peak, self._running)
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1


api = FastAPI(title="lesion-ray", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"bad request parameters: {problems}"}, status_code=422)


@api.middleware("http")
async def _no_tracebacks(request: Request, call_next: Any) -> Response:
    """Anything unexpected is logged here and answered without internals."""
    try:
        return await call_next(request)
    except BackPressureError:
        return JSONResponse({"error": "the server is busy: retry shortly"}, status_code=503)
    except Exception:
        logger.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse({"error": "internal error: the server logged the details"}, status_code=500)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SegmentationApi:
    """HTTP in and out: auth, limits, decoding and validation, encoding the masks."""

    def __init__(self, spec: ServeSpec, model: DeploymentHandle, storage_config: storage.S3Config) -> None:
        storage.configure(storage_config)  # auth_token_file may lie on S3
        token = read_token(spec)
        self.token_digest = hashlib.sha256(token).digest() if token else None
        self.spec, self.model = spec, model
        self.pool = DecodePool(spec.max_concurrent_decodes)
        self.input_size: int | None = None  # learnt from the model, updated by every answer
        web = importlib.resources.files("lesion_ray") / "web"
        self.static = {name: (web / name).read_bytes() for name in STATIC}

    def _authorize(self, request: Request) -> None:
        if self.token_digest is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Digests have equal length, so compare_digest's time does not depend on the token.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode()).digest(), self.token_digest):
            raise ApiError(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'")

    async def _body(self, request: Request) -> bytes:
        limit = self.spec.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"bad Content-Length header {declared!r}")
            if int(declared) > limit:
                raise ApiError(413, f"the body has {int(declared):,} bytes, more than max_upload_bytes={limit:,}")
        # Serve's proxy lets each request lift its timeout (header x-request-timeout-seconds), so a
        # body trickling in would hold a slot for good: it gets request_timeout_s here as well.
        timeout = self.spec.request_timeout_s
        try:
            return await asyncio.wait_for(self._read(request, limit), timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within request_timeout_s={timeout:g}") from None

    @staticmethod
    async def _read(request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: Content-Length may be absent or lie
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is over max_upload_bytes={limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _size(self) -> int:
        if self.input_size is None:
            self.input_size = (await self.model.info.remote())["input_size"]
        return self.input_size

    async def _prepare(self, images: list[tuple[bytes, str]]) -> list[tuple[np.ndarray, tuple[int, int]]]:
        size = await self._size()
        return await asyncio.gather(*(self.pool.run(prepare, data, self.spec.max_pixels, size, what)
                                      for data, what in images))

    async def _predict(self, x: np.ndarray) -> Prediction:
        pred = await self.model.predict.remote(x)  # batched with the images of other requests
        self.input_size = pred.input_size
        return pred

    @api.post("/v1/segment")
    async def segment(self, request: Request, format: Literal["png", "json"] = "png",
                      overlay: bool = False) -> Response:
        self._authorize(request)
        body = await self._body(request)
        spec = self.spec
        data = await self.pool.run(upload_image, body, request.headers.get("content-type", "application/octet-stream"),
                                   spec.max_pixels, spec.max_request_pixels)
        ((x, orig),) = await self._prepare([(data, "the upload")])
        pred = await self._predict(x)
        headers = {"X-Model": f"{pred.name}@{pred.version}"}
        if format == "json":
            return JSONResponse(await self.pool.run(segment_json, pred, orig), headers=headers)
        if overlay:
            return Response(await self.pool.run(overlay_image, data, pred, orig, spec.max_pixels),
                            media_type="image/jpeg", headers=headers)
        return Response(await self.pool.run(union_png, pred, orig), media_type="image/png", headers=headers)

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> JSONResponse:
        """The tutorial's deployment API: rows of image data URIs in, rows of mask data URIs out."""
        self._authorize(request)
        body = await self._body(request)
        spec = self.spec
        images = await self.pool.run(predict_images, body, spec.max_rows, spec.max_pixels, spec.max_request_pixels)
        # Every row is decoded before any reaches the model; the rows are then batched together.
        prepared = await self._prepare(images)
        preds = await asyncio.gather(*(self._predict(x) for x, _ in prepared))
        masks = await asyncio.gather(*(self.pool.run(union_png, p, orig)
                                       for p, (_, orig) in zip(preds, prepared, strict=True)))
        out = [{"mask": "data:image/png;base64," + base64.b64encode(m).decode()} for m in masks]
        return JSONResponse({"rows": out, "model": {"name": preds[0].name, "version": preds[0].version}})

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> JSONResponse:
        self._authorize(request)
        ingress = {"max_concurrent_decodes": self.spec.max_concurrent_decodes, "decodes_peak": self.pool.peak}
        return JSONResponse(await self.model.info.remote() | {"ingress": ingress})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """For load balancers and probes (no token): ok when a model replica answers."""
        try:
            await self.model.info.remote()
        except Exception as exc:
            logger.warning(f"healthz: the model deployment does not answer: {type(exc).__name__}: {exc}")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/")
    async def page(self, request: Request) -> Response:
        if not request.url.path.endswith("/"):  # the page's relative URLs need the trailing slash
            return RedirectResponse(request.url.path + "/")
        return HTMLResponse(self.static["index.html"])

    @api.get("/{name}")
    async def static_file(self, name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, f"no such page: {name}")
        return Response(self.static[name], media_type=STATIC[name])


# --- Job ---------------------------------------------------------------------------------


def build_app(spec: ServeSpec, settings: Settings) -> serve.Application:
    """The bound application: ingress -> model, both autoscaled, their replicas on ``settings``' storage
    and registry."""
    spec = dataclasses.replace(spec, registry=spec.registry or RegistryUri(settings.registry))
    options = {
        "autoscaling_config": {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                               "target_ongoing_requests": spec.target_ongoing_requests},
        "max_ongoing_requests": spec.max_ongoing_requests,
    }
    model = SegmentationModel.options(**options).bind(spec, settings.storage)
    # Only the proxies' queue needs a bound: the ingress calls the model for at most
    # max_ongoing_requests x max_rows images, and a model queue limit would turn a burst of rows into 503s.
    return SegmentationApi.options(**options, max_queued_requests=spec.max_queued_requests).bind(
        spec, model, settings.storage)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for Serve config files: ``lesion_ray.serve:app_builder`` with the spec as ``args``."""
    spec = from_dict(ServeSpec, args, "serve config args")
    spec.validate("serve config args", "")
    # No cluster config here: the spec's storage and registry, else the AWS variables and runs/registry.
    return build_app(spec, Settings.build(job=spec))


def serve_config(spec: ServeSpec) -> dict[str, Any]:
    """A Serve config file (``serve deploy``; KubeRay RayService ``serveConfigV2``) for this spec."""
    return {
        "proxy_location": spec.proxy_location,
        "http_options": http_options(spec),
        "applications": [{
            "name": spec.name,
            "route_prefix": spec.route_prefix,
            "import_path": "lesion_ray.serve:app_builder",
            "args": to_dict(spec),
        }],
    }


def http_options(spec: ServeSpec) -> dict[str, Any]:
    return {"host": spec.host, "port": spec.port, "request_timeout_s": spec.request_timeout_s}


def run(spec: ServeSpec, settings: Settings, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until Ctrl-C, SIGTERM, ``stop`` is set or the application is deleted (``serve delete``);
    then delete the application and shut Serve down."""
    read_token(spec)  # fail now, not in every replica, when the token is missing
    serve.start(proxy_location=spec.proxy_location, http_options=http_options(spec))
    serve.run(build_app(spec, settings), name=spec.name, route_prefix=spec.route_prefix)
    url = f"http://{spec.host}:{spec.port}{spec.route_prefix.rstrip('/')}/"
    info = serve.get_deployment_handle("SegmentationModel", app_name=spec.name).info.remote().result()
    report.info(f"serving {info['name']}@{info['version']} at {url} (web page), {url}v1/segment, {url}v1/predict; "
                "Ctrl-C to stop")
    started = time.monotonic()
    stopped_by = _wait(spec.name, stop or threading.Event())
    if stopped_by != "application deleted":
        serve.delete(spec.name)
    serve.shutdown()
    return {"url": url, "model": f"{info['name']}@{info['version']}", "stopped_by": stopped_by,
            "served_s": round(time.monotonic() - started, 1)}


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
