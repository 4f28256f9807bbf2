"""The HTTP ingress: bearer token (every ``/v1`` route gets it from its router; ``/healthz`` and the
page are public), request budgets, decoding and validation in a few threads, and the answers."""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types.
import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE, parse_options_header
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.staticfiles import StaticFiles

from lesion_ray import storage
from lesion_ray.data import ATTRIBUTES
from lesion_ray.postprocess import mask_png, tint
from lesion_ray.preprocess import BadImage, decode_image, open_image, to_model_input
from lesion_ray.serve.config import ServeSpec, read_token
from lesion_ray.serve.deployment import LABELS, Prediction, masks_at

logger = logging.getLogger("ray.serve")

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^;,]*)*?;base64,(?P<data>.*)$", re.DOTALL)
ROWS_EXAMPLE = '{"rows": [{"image": "data:image/png;base64,..."}]}'
# The upload form needs one part; a bound keeps a crafted body of thousands of parts cheap to refuse.
MAX_FORM_PARTS = 16
T = TypeVar("T")


class DecodePool:
    """``size`` threads for the work whose memory grows with a request's content (JSON, decoding, masks).
    Unlike a semaphore around ``asyncio.to_thread``, a cancelled request keeps its thread: the cap holds."""

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


@contextlib.contextmanager
def client_errors(what: str) -> Iterator[None]:
    """Turn a failure to read or decode the image ``what`` into the client error it is (413, 415, 422)."""
    try:
        yield
    except (BadImage, OSError) as exc:  # OSError: damaged data that a PIL step met outside BadImage's checks
        reason = str(exc)  # a BadImage's reason
        if reason.startswith("decompression bomb"):
            raise HTTPException(413, f"{what} is too large to decode ({reason}); send a smaller image") from None
        if reason == "not an image":
            raise HTTPException(415, f"{what} is not an image: send PNG or JPEG bytes") from None
        raise HTTPException(422, f"{what} cannot be decoded ({reason}): send a complete PNG or JPEG") from None


def check_pixels(images: list[tuple[bytes, str]], max_pixels: int, max_request_pixels: int) -> None:
    """413 when one of the (bytes, what it is) ``images`` is over ``max_pixels`` or all of them are over
    ``max_request_pixels``, from their headers alone."""
    total = 0
    for data, what in images:
        with client_errors(what):
            width, height = open_image(data, max_pixels).size
        total += width * height
    if total > max_request_pixels:
        raise HTTPException(413, f"the request's images have {total:,} pixels, more than max_request_pixels="
                                 f"{max_request_pixels:,}: send fewer or smaller images")


def prepare(data: bytes, max_pixels: int, size: int, what: str = "the upload") -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> (model input uint8 [3, size, size], (orig_height, orig_width)); errors name ``what``."""
    with client_errors(what):
        image, orig = decode_image(data, max_pixels=max_pixels, target=size)
    return to_model_input([image], size)[0], orig


def union_png(pred: Prediction, orig: tuple[int, int]) -> bytes:
    """The lesion mask (Task 2: any attribute) at the original size, as PNG."""
    return mask_png(masks_at(pred, orig).any(0))


def overlay_image(data: bytes, pred: Prediction, orig: tuple[int, int], max_pixels: int) -> bytes:
    """The image with its masks tinted, as JPEG; decoded again, not kept at full size while the model works."""
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
        "height": orig[0], "width": orig[1],
        "threshold": pred.threshold,
        "mask": base64.b64encode(mask_png(union)).decode(),
        "lesion_area_fraction": float(union.mean()),
        "attributes": dict(zip(LABELS[pred.task], pred.scores, strict=True)),
    }
    if pred.task == 2:
        body["attribute_masks"] = {a: base64.b64encode(mask_png(m)).decode()
                                   for a, m in zip(ATTRIBUTES, masks, strict=True)}
    return body


async def read_body(request: Request, spec: ServeSpec, form: bool = False) -> bytes:
    """The body (``form``: the file of its multipart form) within max_upload_bytes and request_timeout_s."""
    limit = spec.max_upload_bytes
    work = _form_file(request, limit) if form else _join(_chunks(request, limit))
    # Serve's proxy lets each request lift its timeout (x-request-timeout-seconds): a trickling body gets it here.
    timeout = spec.request_timeout_s
    try:
        return await asyncio.wait_for(work, timeout)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the body did not arrive within request_timeout_s={timeout:g}") from None


async def _chunks(request: Request, limit: int, delimiter: bytes = b"") -> AsyncIterator[bytes]:
    """The body as it arrives, refused once over ``limit`` bytes or, given a multipart ``delimiter``, once
    over MAX_FORM_PARTS parts: counted in C before the parser (Python, byte by byte in headers) sees them."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise HTTPException(413, f"the body has {int(declared):,} bytes, more than max_upload_bytes={limit:,}")
    size = parts = 0
    tail = b""  # the end of the last chunk, too short to hold a whole delimiter: none counts twice
    async for chunk in request.stream():  # counted as it arrives: Content-Length may be absent or lie
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is over max_upload_bytes={limit:,} bytes")
        if delimiter:
            window = tail + chunk
            parts += window.count(delimiter)
            if parts > MAX_FORM_PARTS + 1:  # the closing delimiter ends the last part
                raise HTTPException(413, f"the multipart form has more than {MAX_FORM_PARTS} parts: send the image "
                                         "in a single field named 'file'")
            tail = window[len(window) - len(delimiter) + 1:]
        yield chunk


async def _join(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def _form_file(request: Request, limit: int) -> bytes:
    """The part named ``file`` (or the first with a file name) of a multipart/form-data body, parsed as it comes."""
    boundary = parse_options_header(request.headers["content-type"])[1].get(b"boundary", b"")
    chunks = _chunks(request, limit, b"--" + boundary)
    try:
        # Any part may be as large as the body: fields stay in memory, files spool to disk past 1 MiB.
        form = await MultiPartParser(request.headers, chunks, max_part_size=limit).parse()
    except MultiPartException as exc:
        limits = (f"; a part may have {DEFAULT_MAX_HEADER_COUNT} header lines of up to {DEFAULT_MAX_HEADER_SIZE:,} "
                  "bytes" if isinstance(exc.__cause__, MultipartParseError) else "")
        cause = exc.__cause__ or exc.message
        raise HTTPException(400, f"malformed multipart/form-data body ({cause}){limits}") from None
    try:
        upload = next((value for name, value in form.multi_items()
                       if isinstance(value, UploadFile) and (name == "file" or value.filename)), None)
        if upload is None:
            raise HTTPException(422, "the multipart form has no file: send the image as a file (with a file name) "
                                     "in a field named 'file'")
        return await upload.read()
    finally:
        await form.close()


class Row(BaseModel):
    image: str  # a data URI: data:image/png;base64,...


class PredictRequest(BaseModel):
    """The body of /v1/predict (the tutorial's deployment API); other keys are ignored."""

    rows: list[Row] = Field(min_length=1)


def predict_images(body: bytes, max_rows: int) -> list[tuple[bytes, str]]:
    """The images of a /v1/predict body with what each is (``rows[i].image``). :mod:`json` parses it
    (pydantic's parser would accept integers of more than 4,300 digits), pydantic validates."""
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise HTTPException(400, f"the body is not valid JSON ({exc}): send {ROWS_EXAMPLE}") from None
    except RecursionError:
        raise HTTPException(400, f"the JSON body is nested too deeply: send {ROWS_EXAMPLE}") from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if isinstance(rows, list) and len(rows) > max_rows:  # before validating: a million rows are refused cheaply
        raise HTTPException(413, f"{len(rows):,} rows, more than max_rows={max_rows}: send them in several requests")
    try:
        request = PredictRequest.model_validate(payload)
    except ValidationError as exc:  # answered as FastAPI's own validation errors are
        raise RequestValidationError(exc.errors()) from None
    wheres = [f"rows[{i}].image" for i in range(len(request.rows))]
    return [(data_uri_bytes(row.image, where), where) for row, where in zip(request.rows, wheres, strict=True)]


def data_uri_bytes(uri: str, where: str) -> bytes:
    match = DATA_URI.match(uri)
    if not match:
        raise HTTPException(422, f"{where} is not a base64 data URI: expected 'data:image/png;base64,...'")
    if match["mime"].lower() not in ("image/png", "image/jpeg", "image/jpg"):
        raise HTTPException(415, f"{where} has type {match['mime']}: send image/png or image/jpeg")
    try:
        return base64.b64decode(match["data"], validate=True)
    except ValueError:  # binascii.Error
        raise HTTPException(422, f"{where} holds invalid base64 data") from None


api = FastAPI(title="lesion-ray", docs_url=None, redoc_url=None, openapi_url=None)  # no public route map


async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]) -> None:
    """Every /v1 route's dependency (from their router): the bearer token, when the spec names one."""
    digest = serve.get_replica_context().servable_object.token_digest  # this replica's SegmentationApi
    given = credentials.credentials if credentials else ""
    # Digests have equal length, so compare_digest's time does not depend on the token.
    if digest and not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), digest):
        raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
api.include_router(v1)  # serve.ingress collects its routes (below) from here


@api.exception_handler(StarletteHTTPException)
async def _client_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Bad query parameters, or a /v1/predict body that is not ``{"rows": [{"image": "..."}, ...]}``."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"bad request: {problems}"}, status_code=422)


@api.middleware("http")
async def _no_tracebacks(request: Request, call_next: Any) -> Response:
    """Anything unexpected is logged here and answered without internals."""
    try:
        return await call_next(request)
    except Exception:
        logger.exception(f"{request.method} {request.url.path} failed")
        return JSONResponse({"error": "internal error: the server logged the details"}, status_code=500)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SegmentationApi:
    def __init__(self, spec: ServeSpec, model: DeploymentHandle, storage_config: storage.S3Config) -> None:
        storage.configure(storage_config)  # auth_token_file may lie on S3
        token = read_token(spec)
        self.token_digest = hashlib.sha256(token).digest() if token else None
        self.spec, self.model = spec, model
        self.pool = DecodePool(spec.max_concurrent_decodes)
        self.input_size: int | None = None  # learnt from the model, updated by every answer
        # Made on the replica: StaticFiles keeps the folder's path, which may differ from the driver's.
        self.files = StaticFiles(packages=[("lesion_ray", "web")], html=True)

    async def _segment(self, images: list[tuple[bytes, str]]) -> list[tuple[Prediction, tuple[int, int]]]:
        """(prediction, original size) of each (bytes, what it is); every image is checked and decoded before
        any reaches the model, which batches them with the images of other requests."""
        spec, pool = self.spec, self.pool
        await pool.run(check_pixels, images, spec.max_pixels, spec.max_request_pixels)
        if self.input_size is None:
            self.input_size = (await self.model.info.remote())["input_size"]
        prepared = await asyncio.gather(*(pool.run(prepare, data, spec.max_pixels, self.input_size, what)
                                          for data, what in images))
        preds = await asyncio.gather(*(self.model.predict.remote(x) for x, _ in prepared))
        self.input_size = preds[-1].input_size
        return [(pred, orig) for pred, (_, orig) in zip(preds, prepared, strict=True)]

    @v1.post("/segment")
    async def segment(self, request: Request, format: Literal["png", "json"] = "png",
                      overlay: bool = False) -> Response:
        spec, pool = self.spec, self.pool
        media = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        if not (media in ("multipart/form-data", "application/octet-stream") or media.startswith("image/")):
            raise HTTPException(415, f"Content-Type {media} is not supported here: send image bytes (image/jpeg, "
                                     "image/png) or a multipart form with a 'file' field; JSON goes to /v1/predict")
        data = await read_body(request, spec, form=media == "multipart/form-data")
        ((pred, orig),) = await self._segment([(data, "the upload")])
        headers = {"X-Model": f"{pred.name}@{pred.version}"}
        if format == "json":
            return JSONResponse(await pool.run(segment_json, pred, orig), headers=headers)
        if overlay:
            return Response(await pool.run(overlay_image, data, pred, orig, spec.max_pixels),
                            media_type="image/jpeg", headers=headers)
        return Response(await pool.run(union_png, pred, orig), media_type="image/png", headers=headers)

    @v1.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        body = await read_body(request, self.spec)
        images = await self.pool.run(predict_images, body, self.spec.max_rows)
        results = await self._segment(images)
        masks = await asyncio.gather(*(self.pool.run(union_png, pred, orig) for pred, orig in results))
        rows = [{"mask": "data:image/png;base64," + base64.b64encode(m).decode()} for m in masks]
        pred = results[0][0]
        return JSONResponse({"rows": rows, "model": {"name": pred.name, "version": pred.version}})

    @v1.get("/model")
    async def model_info(self) -> JSONResponse:
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
    @api.get("/{name}")
    async def page(self, request: Request) -> Response:
        """The web page and its files (no token); ``GET {route_prefix}`` redirects to the trailing slash,
        which the page's relative URLs need (a relative Location: the Host header is the client's)."""
        name = request.path_params.get("name", "")
        if not name and not request.url.path.endswith("/"):
            return RedirectResponse(request.url.path + "/")
        return await self.files.get_response(name, request.scope)
