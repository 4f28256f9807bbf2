"""One place that understands storage URIs: local paths, ``file://`` and ``s3://``.

Every stage reads and writes through these functions, so a job that works on a local
folder works unchanged on AWS S3 or any S3-compatible store. One :class:`S3Config` (endpoint,
region, attempts per request) per process, installed by :func:`configure`, serves both boto3
(this module's own I/O) and the pyarrow filesystem handed to Ray (:func:`pyarrow_filesystem`);
credentials come from the standard AWS chain. Writes are atomic: a
reader never sees a partially written object under its final name. Local files are created
with mode 0o666 less the process umask, like any file the user creates.

For things several processes write at once (the model registry): :func:`create_exclusive`
creates an object only if nothing is there, and :func:`read_with_tag` with
:func:`replace_if_unchanged` is a compare-and-swap. On S3 both are conditional PUTs
(``If-None-Match: *``, ``If-Match: <ETag>``), which the store must honour (AWS S3 does).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import os
import queue
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_MULTIPART_CHUNK = 16 * 1024 * 1024
DEFAULT_ATTEMPTS = 8  # per S3 request, unless AWS_MAX_ATTEMPTS or the settings say otherwise
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")
_CONFLICT_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
_PAGE = 1000  # keys per listing page (S3's maximum)
LISTING_RANGES = 16  # S3 key ranges listed side by side (real S3 answers each list request in tens of ms)
_SPLIT_LEVELS = 12  # characters of the key names looked at to find them
_HIGHEST_CHARACTER = "\U0010ffff"  # S3 orders keys by UTF-8 bytes: this sorts after every character
_IO_THREADS = 8  # objects one task reads or writes at once (concurrently)
Item = TypeVar("Item")
Result = TypeVar("Result")


class StorageError(Exception):
    """A URI that cannot be read or written; the message says what to do."""


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    problem: str | None = None  # why this entry cannot be read as a file (a name no URI holds, an unreadable folder)


def concurrently(work: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``[work(item) for item in items]`` in a few threads: on S3 a read or write is mostly waiting for the network."""
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        return list(pool.map(work, items))


@dataclass(frozen=True)
class S3Config:
    """Where this project's S3 requests go and how often each is tried (no credentials: those stay
    with the AWS chain)."""

    endpoint_url: str | None = None  # None: AWS itself
    region: str | None = None
    max_attempts: int = DEFAULT_ATTEMPTS

    @classmethod
    def from_environment(cls, endpoint_url: str | None = None, region: str | None = None) -> S3Config:
        """``endpoint_url`` and ``region`` where given, else the AWS SDKs' standard variables
        (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_REGION``); attempts
        from ``AWS_MAX_ATTEMPTS``. Read once, when the settings are built."""

        def first(*names: str) -> str | None:
            return next((os.environ[name] for name in names if os.environ.get(name)), None)

        # AWS_MAX_ATTEMPTS is the AWS SDKs' own setting; our default is higher than their 3, since one archive
        # job makes millions of requests and a transient error must not cost an image.
        attempts = first("AWS_MAX_ATTEMPTS") or str(DEFAULT_ATTEMPTS)
        if not attempts.isdigit() or int(attempts) < 1:
            raise StorageError(f"AWS_MAX_ATTEMPTS must be a whole number of attempts (1 or more), got {attempts!r}")
        return cls(endpoint_url=endpoint_url or first(*ENDPOINT_ENV_VARS),
                   region=region or first("AWS_DEFAULT_REGION", "AWS_REGION"), max_attempts=int(attempts))

    def environment(self) -> dict[str, str]:
        """These settings as the AWS SDKs' standard variables, for a process that builds its own settings
        elsewhere (a submitted job's driver, a KubeRay pod). No secrets."""
        # Both endpoint names: a node's own AWS_ENDPOINT_URL_S3 would win over AWS_ENDPOINT_URL alone.
        env = {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url,
               "AWS_DEFAULT_REGION": self.region, "AWS_MAX_ATTEMPTS": str(self.max_attempts)}
        return {name: value for name, value in env.items() if value}


_config: S3Config | None = None  # installed by configure(); until then, the AWS variables


def configure(config: S3Config) -> None:
    """Use ``config`` for every S3 request of this process (boto3 and :func:`pyarrow_filesystem`)."""
    global _config
    _config = config


def current_config() -> S3Config:
    """The installed :class:`S3Config`; where none was installed, the one the AWS variables describe."""
    return _config or S3Config.from_environment()


def installer(config: S3Config) -> Callable[[], None]:
    """A function that installs ``config``: a Ray ``worker_process_setup_hook``, which Ray pickles and runs in
    every worker of the job when it starts, so the workers use the driver's settings."""

    def install_storage_config() -> None:
        configure(config)

    return install_storage_config


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """``file://`` and relative paths become absolute local paths; ``s3://`` stays."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in {uri!r}: use a local path, file:// or s3://")
    return str(Path(uri).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def basename(uri: str) -> str:
    if not (uri.startswith("/") or is_s3(uri)):  # listed URIs are normal already: millions of them, at speed
        uri = normalize(uri)
    return uri.rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).parent)


def is_within(uri: str, folder: str) -> bool:
    """True when ``uri`` is ``folder`` or lies under it (after normalisation)."""
    uri, folder = normalize(uri).rstrip("/"), normalize(folder).rstrip("/")
    return uri == folder or uri.startswith(folder + "/")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET/PREFIX")
    return bucket, key


# --- S3 -----------------------------------------------------------------------------------

def _s3_client():
    config = current_config()
    return _client_for(config.endpoint_url, config.region, config.max_attempts, os.getpid())


@functools.lru_cache(maxsize=8)
def _client_for(endpoint: str | None, region: str | None, attempts: int, pid: int):
    # Keyed by pid too: a boto3 client must not cross a fork into a Ray worker.
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        # Retries back off exponentially with jitter (500, 503, throttling, dropped connections).
        config=Config(retries={"max_attempts": attempts, "mode": "adaptive"}, max_pool_connections=32),
    )


def _where() -> str:
    endpoint = current_config().endpoint_url
    return f" at {endpoint}" if endpoint else ""


def _s3_error(exc: Exception, uri: str, action: str) -> StorageError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = _where()
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no AWS credentials found. Set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role."
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            bucket, _ = split_s3(uri)
            return StorageError(f"cannot {action} {uri}: bucket '{bucket}' does not exist{where}")
        if code in _MISSING_CODES:
            return StorageError(f"cannot {action} {uri}: no such object{where}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"cannot {action} {uri}: access denied ({code}); check the credentials")
        return StorageError(f"cannot {action} {uri}: {code or exc}")
    return StorageError(f"cannot {action} {uri}{where}: {type(exc).__name__}: {exc}")


def _s3_call(uri: str, action: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(exc, uri, action) from None


def bucket_exists(uri: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(normalize(uri))
    try:
        _s3_client().head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise _s3_error(exc, uri, "reach the bucket of") from None
    except BotoCoreError as exc:
        raise _s3_error(exc, uri, "reach the bucket of") from None


# --- Public operations -------------------------------------------------------------------


def exists(uri: str) -> bool:
    """True when ``uri`` is an object/file, or a prefix/folder with something under it."""
    uri = normalize(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    if key:
        from botocore.exceptions import ClientError

        try:
            _s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _MISSING_CODES:
                raise _s3_error(exc, uri, "check") from None
    prefix = key.rstrip("/") + "/" if key else ""
    resp = _s3_call(uri, "list", _s3_client().list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return resp.get("KeyCount", 0) > 0


def is_file(uri: str) -> bool:
    return file_size(uri) is not None


def file_size(uri: str) -> int | None:
    """Size in bytes of the file at ``uri``; None when there is no such file."""
    uri = normalize(uri)
    if not is_s3(uri):
        return os.path.getsize(uri) if os.path.isfile(uri) else None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    if not key:
        return None
    try:
        return _s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
            return None
        raise _s3_error(exc, uri, "check") from None


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, with_problems: bool = False) -> list[FileInfo]:
    """Every file under ``uri`` (recursive), sorted by URI: for small folders; archives stream
    :func:`iter_listing` instead. An entry the listing has a problem with (:attr:`FileInfo.problem`: an unreadable
    folder, a name no URI holds) fails it, unless ``with_problems``: then the caller reports it."""
    lowered = tuple(s.lower() for s in suffixes or ())
    listed = [f for page in iter_listing(uri) for f in page]
    if not with_problems and (bad := next((f for f in listed if f.problem), None)):
        raise StorageError(f"cannot list {uri}: {bad.uri}: {bad.problem}")
    out = [f for f in listed if not lowered or f.uri.lower().endswith(lowered)]
    out.sort(key=lambda f: f.uri)
    return out


def iter_listing(uri: str, after: str | None = None, through: str | None = None) -> Iterator[list[FileInfo]]:
    """The files under ``uri`` (recursive) a page at a time, as the listing goes: pages of up to 1,000
    keys in key order on S3; with ``after``/``through`` (full URIs, S3 only: a local folder is listed whole)
    only the keys in (after, through]."""
    uri = normalize(uri)
    if not is_s3(uri):
        yield from _local_pages(uri)
        return
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    start = {"StartAfter": split_s3(after)[1]} if after else {}
    last = split_s3(through)[1] if through else None
    try:
        for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **start):
            objects = page.get("Contents", [])
            files = [FileInfo(f"s3://{bucket}/{o['Key']}", int(o["Size"])) for o in objects
                     if last is None or o["Key"] <= last]
            if files:
                yield files
            if len(files) < len(objects):
                return
    except Exception as exc:  # botocore errors surface from the paginator
        raise _s3_error(exc, uri, "list") from None


def _local_pages(folder: str) -> Iterator[list[FileInfo]]:
    """Every file under ``folder``, through linked folders too (each real folder once, so a link to an ancestor
    ends). Nothing is left out unsaid: a broken or looping link is listed (its read fails), a folder that cannot
    be read (``lost+found``) is listed with its :attr:`FileInfo.problem`; what vanishes while the walk goes is
    not there to list."""
    if not os.path.isdir(folder):
        raise StorageError(f"cannot list {folder}: no such directory")
    page: list[FileInfo] = []

    def unreadable(exc: OSError) -> None:
        if exc.filename == folder:  # the folder asked for: nothing to list at all
            raise StorageError(f"cannot list {folder}: {exc.strerror or exc}")
        if not isinstance(exc, FileNotFoundError):
            page.append(_local_file(exc.filename, 0, f"a folder that cannot be read ({exc.strerror or exc}): its "
                                                     "files are not listed"))

    walked: set[str] = set()
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        if (real := os.path.realpath(root)) in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and not name.endswith(".partial"):
                path = os.path.join(root, name)
                try:
                    page.append(_local_file(path, os.path.getsize(path)))
                except OSError:  # a link to nothing or to itself: listed, so that its read fails as its row
                    if os.path.lexists(path):
                        page.append(_local_file(path, 0))
            if len(page) >= _PAGE:
                yield page
                page = []
    if page:
        yield page


def _local_file(path: str, size: int, problem: str | None = None) -> FileInfo:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes Python keeps as surrogates: no manifest, ledger or URI can hold them
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return FileInfo(shown, size, "the file name is not valid UTF-8 (another encoding's): rename it")
    return FileInfo(path, size, problem)


def list_folders(uri: str) -> list[str]:
    """The names of the folders (S3: common prefixes) directly under ``uri``."""
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise StorageError(f"cannot list {uri}: no such directory")
        return sorted(e.name for e in os.scandir(uri) if e.is_dir() and not e.name.startswith("."))
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    names = []
    try:
        for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                             Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except Exception as exc:  # botocore errors surface from the paginator
        raise _s3_error(exc, uri, "list") from None
    return sorted(names)


def iter_listing_parallel(uri: str, ranges: int = LISTING_RANGES) -> Iterator[list[FileInfo]]:
    """:func:`iter_listing`, on S3 with up to ``ranges`` key ranges listed side by side after the first page
    (which comes at once): pages come in no particular order across ranges, every key exactly once. The
    ranges start at key prefixes that hold objects (``ISIC_00000``, ``ISIC_00001``, ...), found with
    one-key requests."""
    uri = normalize(uri)
    pages = iter_listing(uri)
    first = next(pages, [])
    if first:
        yield first
    if not is_s3(uri) or len(first) < _PAGE:
        yield from pages
        return
    pages.close()
    try:
        points = [p for p in split_points(uri, ranges) if p > first[-1].uri]
    except StorageError:  # only a faster way to list: the listing itself retries, and says what went wrong
        points = []
    bounds = [first[-1].uri, *points, None]
    queued: queue.Queue = queue.Queue(maxsize=2 * len(bounds))
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                queued.put(item, timeout=0.1)
                return True
        return False

    def list_range(after: str | None, through: str | None) -> None:
        try:
            for page in iter_listing(uri, after, through):
                if not offer(page):  # the consumer is gone: list no further
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(exc)
        offer(None)

    with ThreadPoolExecutor(len(bounds) - 1, thread_name_prefix="listing") as pool:
        for after, through in itertools.pairwise(bounds):
            pool.submit(list_range, after, through)
        try:
            running = len(bounds) - 1
            while running:
                item = queued.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()


def split_points(uri: str, wanted: int) -> list[str]:
    """At most ``wanted`` key prefixes under ``uri`` (full URIs, sorted) to start listing ranges at: the
    distinct prefixes one character longer at a time (``I``, ``IS``, ... ``ISIC_000``, ``ISIC_001``, ...)
    until a level has ``wanted`` of them, each level found by skipping from one prefix to the next with
    one-key requests; then evenly spaced ones of that level."""
    bucket, key = split_s3(uri)
    root = key.rstrip("/") + "/" if key else ""
    client = _s3_client()

    def children(prefix: str) -> list[str]:
        found: list[str] = []
        start = prefix
        while len(found) < wanted:
            resp = _s3_call(uri, "list", client.list_objects_v2, Bucket=bucket, Prefix=prefix, StartAfter=start,
                            MaxKeys=1)
            if not resp.get("KeyCount"):
                break
            child = resp["Contents"][0]["Key"][: len(prefix) + 1]
            if found and child == found[-1]:  # a key beyond the highest character: nothing more to skip to
                break
            if len(child) > len(prefix):
                found.append(child)
            start = child + _HIGHEST_CHARACTER
        return found

    level = [root]
    with ThreadPoolExecutor(32, thread_name_prefix="listing-probe") as pool:
        for _ in range(_SPLIT_LEVELS):
            deeper = [child for found in pool.map(children, level) for child in found]
            if not deeper:
                break
            level = deeper
            if len(level) >= wanted:
                break
    if len(level) > wanted:  # evenly spaced among them: at most `wanted` ranges side by side
        level = [level[i * len(level) // wanted] for i in range(wanted)]
    return [f"s3://{bucket}/{p}" for p in level] if len(level) > 1 else []


def read_bytes(uri: str) -> bytes:
    uri = normalize(uri)
    if is_s3(uri):
        return _read_object(uri)
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"cannot read {uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"cannot read {uri}: it is a directory") from None
    except PermissionError:
        raise StorageError(f"cannot read {uri}: permission denied") from None
    except OSError as exc:  # an I/O error, a stale NFS handle ...: this file's failure, not the job's
        raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None


def _read_object(uri: str) -> bytes:
    """An object's bytes. botocore retries a GET that fails, but not a body cut short after the answer began (a
    reset connection, a read timeout): the whole GET is tried again here, with backoff and jitter, as often."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError  # what botocore passes on unwrapped (a TLS error mid-body)

    bucket, key = split_s3(uri)
    attempts = current_config().max_attempts
    for attempt in itertools.count(1):
        resp = _s3_call(uri, "read", _s3_client().get_object, Bucket=bucket, Key=key)
        try:
            return resp["Body"].read()
        except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, HTTPError) as exc:
            if attempt >= attempts:
                raise StorageError(f"cannot read {uri}{_where()}: the answer was cut short {attempt} times "
                                   f"({type(exc).__name__})") from None
            time.sleep(random.uniform(0, min(20.0, 0.1 * 2**attempt)))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically: the object appears whole or not at all."""
    with open_write(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[io.BufferedIOBase]:
    """A writable binary stream that is published under ``uri`` only if the block succeeds.

    Local: a hidden temporary file in the same folder, renamed into place. S3: a spooled
    buffer sent as one PUT, or as a multipart upload that is aborted on failure.
    """
    uri = normalize(uri)
    if is_s3(uri):
        with tempfile.SpooledTemporaryFile(max_size=_MULTIPART_CHUNK) as buf:
            yield buf
            size = buf.tell()
            buf.seek(0)
            _s3_upload(uri, buf, size)
        return
    with _local_temp(uri) as (f, tmp):
        yield f
        f.close()
        os.replace(tmp, uri)


@contextlib.contextmanager
def _local_temp(uri: str) -> Iterator[tuple[io.BufferedWriter, str]]:
    """A new hidden ``.partial`` file beside ``uri`` (listings skip it), removed on exit unless
    renamed away. Close it before publishing it under ``uri``, so its content is complete.

    Created with mode 0o666 so that the umask decides who may read the result (``mkstemp``
    would make every output 0600, unreadable to the account that serves or archives it).
    """
    folder, name = os.path.split(uri)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.partial")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _s3_upload(uri: str, buf, size: int) -> None:
    bucket, key = split_s3(uri)
    client = _s3_client()
    if size <= _MULTIPART_CHUNK:
        _s3_call(uri, "write", client.put_object, Bucket=bucket, Key=key, Body=buf.read())
        return
    upload = _s3_call(uri, "write", client.create_multipart_upload, Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]
    try:
        parts = []
        number = 1
        while chunk := buf.read(_MULTIPART_CHUNK):
            resp = client.upload_part(Bucket=bucket, Key=key, PartNumber=number, UploadId=upload_id, Body=chunk)
            parts.append({"ETag": resp["ETag"], "PartNumber": number})
            number += 1
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(exc, Exception):
            raise _s3_error(exc, uri, "write") from None
        raise


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there: True when this call created it,
    False when something was there already. Of many concurrent callers exactly one wins, and the
    object appears complete or not at all.

    Local: a temporary file hard-linked to the name (the link fails when the name is taken).
    S3: one PUT with ``If-None-Match: *`` (so at most 5 GiB).
    """
    uri = normalize(uri)
    if is_s3(uri):
        return _s3_put_if(uri, data, IfNoneMatch="*")
    with _local_temp(uri) as (f, tmp):
        f.write(data)
        f.close()
        try:
            os.link(tmp, uri)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {exc.strerror}") from None
    return True


def read_with_tag(uri: str) -> tuple[bytes, str] | None:
    """The bytes at ``uri`` and a tag for :func:`replace_if_unchanged`; None when nothing is there.

    S3: the object's ETag. Local: the content's SHA-256, so the swap compares content.
    """
    uri = normalize(uri)
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            resp = _s3_client().get_object(Bucket=bucket, Key=key)
            return resp["Body"].read(), resp["ETag"]
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return None
            raise _s3_error(exc, uri, "read") from None
    try:
        with open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc.strerror}") from None
    return data, hashlib.sha256(data).hexdigest()


def replace_if_unchanged(uri: str, data: bytes, tag: str | None) -> bool:
    """Compare-and-swap for small objects such as pointers: write ``data`` at ``uri`` only if it
    still holds what :func:`read_with_tag` returned with ``tag`` (None: only if nothing is there).
    False when it changed meanwhile: read it again and decide again.

    S3: a PUT with ``If-Match: <ETag>`` or ``If-None-Match: *``. Local: the compare and the atomic
    replace run under an exclusive ``flock`` on a hidden sibling ``.<name>.lock``, which serialises
    the processes of one machine (of several only where the file system shares flock locks).
    """
    uri = normalize(uri)
    if is_s3(uri):
        return _s3_put_if(uri, data, **({"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}))
    with _local_lock(uri):
        current = read_with_tag(uri)
        if (current[1] if current else None) != tag:
            return False
        write_bytes(uri, data)
    return True


@contextlib.contextmanager
def _local_lock(uri: str) -> Iterator[None]:
    folder, name = os.path.split(uri)
    try:
        os.makedirs(folder, exist_ok=True)
        # Read-only is enough for flock, so a lock file another account created still works.
        fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise StorageError(f"cannot lock {uri}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _s3_put_if(uri: str, data: bytes, **condition: str) -> bool:
    """One conditional PUT: True when written, False when the condition failed (412)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    delays = iter(_CONFLICT_DELAYS_S)
    while True:
        try:
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            return True
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                return False
            # 409 ConditionalRequestConflict: another conditional write of this key was in flight.
            delay = next(delays, None) if status == 409 else None
            if delay is None:
                raise _s3_error(exc, uri, "write") from None
        except BotoCoreError as exc:
            raise _s3_error(exc, uri, "write") from None
        time.sleep(delay)


def delete(uri: str) -> None:
    """Remove a file/object, or everything under a folder/prefix. Missing is not an error."""
    uri = normalize(uri)
    if not is_s3(uri):
        if os.path.isdir(uri):
            shutil.rmtree(uri)
        elif os.path.exists(uri):
            os.unlink(uri)
        return
    bucket, key = split_s3(uri)
    client = _s3_client()
    if key and is_file(uri):
        _s3_call(uri, "delete", client.delete_object, Bucket=bucket, Key=key)
        return
    for page in iter_listing(uri):  # pages of at most 1,000 keys: one request each
        batch = [{"Key": split_s3(f.uri)[1]} for f in page]
        answer = _s3_call(uri, "delete", client.delete_objects, Bucket=bucket, Delete={"Objects": batch})
        if failed := answer.get("Errors"):  # an HTTP 200 that names the keys it did not delete
            raise StorageError(f"could not delete {len(failed)} of the objects under {uri}{_where()}, e.g. "
                               f"s3://{bucket}/{failed[0].get('Key')}: {failed[0].get('Code')} "
                               f"({failed[0].get('Message')})")


def _require_bucket(uri: str, advice: str = "") -> None:
    if not bucket_exists(uri):
        bucket, _ = split_s3(uri)
        raise StorageError(f"bucket '{bucket}' does not exist{_where()}{advice}")


def check_readable(uri: str) -> None:
    """Raise :class:`StorageError` unless ``uri`` exists and can be read."""
    norm = normalize(uri)
    if is_s3(norm):
        _require_bucket(norm)
    if not exists(norm):
        raise StorageError(f"nothing found at {uri}")
    if not is_s3(norm) and not os.access(norm, os.R_OK):
        raise StorageError(f"{uri} is not readable (permission denied)")


def check_writable(uri: str) -> None:
    """Raise :class:`StorageError` unless ``uri`` can be created: its bucket or parent exists."""
    norm = normalize(uri)
    if is_s3(norm):
        _require_bucket(norm, ": create it first")
        return
    probe = Path(norm)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(f"cannot write under {uri}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise StorageError(f"cannot write under {uri}: {probe} is not writable")


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri``, for Ray (Train's storage, Data readers and
    writers): on S3, with the endpoint and region boto3 uses here."""
    uri = normalize(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = current_config()
        # A request may go a minute without a byte before it counts as failed: the AWS C++ SDK's default,
        # 3 s, is less than a busy S3-compatible store can take.
        fs = pafs.S3FileSystem(endpoint_override=config.endpoint_url, region=config.region or "us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=config.max_attempts),
                               connect_timeout=10, request_timeout=60)
        return fs, f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), uri


def local_copy(uri: str, folder: str) -> str:
    """A local path holding ``uri``'s bytes (the path itself when it is already local)."""
    norm = normalize(uri)
    if not is_s3(norm):
        return norm
    path = os.path.join(folder, basename(norm))
    with open(path, "wb") as f:
        f.write(read_bytes(norm))
    return path
