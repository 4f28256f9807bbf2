"""One place that understands storage URIs: local paths, ``file://`` and ``s3://``.

Every stage reads and writes through these functions, so a job that works on a local
folder works unchanged on AWS S3 or any S3-compatible store. The S3 endpoint comes from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (set by the cluster config or the spec,
see :func:`configure`), credentials from the standard AWS chain. Writes are atomic: a
reader never sees a partially written object under its final name.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_MULTIPART_CHUNK = 16 * 1024 * 1024


class StorageError(Exception):
    """A URI that cannot be read or written; the message says what to do."""


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint and region for this process and the Ray workers it starts.

    Values go into the standard AWS environment variables, which the cluster module
    forwards to every Ray worker, so drivers and workers always agree.
    """
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    if region:
        os.environ["AWS_DEFAULT_REGION"] = region


def storage_env() -> dict[str, str]:
    """The storage settings of this process, to forward to Ray workers (no secrets)."""
    names = (*ENDPOINT_ENV_VARS, "AWS_DEFAULT_REGION", "AWS_REGION")
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def endpoint_url() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


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
    return normalize(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).parent)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET/PREFIX")
    return bucket, key


# --- S3 -----------------------------------------------------------------------------------

def _s3_client():
    return _client_for(endpoint_url(), os.environ.get("AWS_DEFAULT_REGION"), os.getpid())


@functools.lru_cache(maxsize=8)
def _client_for(endpoint: str | None, region: str | None, pid: int):
    # Keyed by pid too: a boto3 client must not cross a fork into a Ray worker.
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32),
    )


def _s3_error(exc: Exception, uri: str, action: str) -> StorageError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f" at {endpoint_url()}" if endpoint_url() else ""
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
        if code in ("NoSuchKey", "404", "NotFound"):
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
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
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
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _s3_error(exc, uri, "check") from None


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[FileInfo]:
    """Every file under ``uri`` (recursive), sorted by URI; S3 listings follow every page."""
    uri = normalize(uri)
    out: list[FileInfo] = []
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = _s3_client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
        except Exception as exc:  # botocore errors surface from the paginator
            raise _s3_error(exc, uri, "list") from None
    else:
        if not os.path.isdir(uri):
            raise StorageError(f"cannot list {uri}: no such directory")
        for root, dirs, files in os.walk(uri):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or name.endswith(".partial"):
                    continue
                path = os.path.join(root, name)
                out.append(FileInfo(path, os.path.getsize(path)))
    if suffixes:
        lowered = tuple(s.lower() for s in suffixes)
        out = [f for f in out if f.uri.lower().endswith(lowered)]
    out.sort(key=lambda f: f.uri)
    return out


def read_bytes(uri: str) -> bytes:
    uri = normalize(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        resp = _s3_call(uri, "read", _s3_client().get_object, Bucket=bucket, Key=key)
        return resp["Body"].read()
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"cannot read {uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"cannot read {uri}: it is a directory") from None
    except PermissionError:
        raise StorageError(f"cannot read {uri}: permission denied") from None


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
    folder = os.path.dirname(uri)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(uri)}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, uri)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    keys = [split_s3(f.uri)[1] for f in list_files(uri)] if exists(uri) else []
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        _s3_call(uri, "delete", client.delete_objects, Bucket=bucket, Delete={"Objects": batch})


def _require_bucket(uri: str, advice: str = "") -> None:
    if not bucket_exists(uri):
        bucket, _ = split_s3(uri)
        where = f" at {endpoint_url()}" if endpoint_url() else ""
        raise StorageError(f"bucket '{bucket}' does not exist{where}{advice}")


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
    """A pyarrow filesystem and the path inside it for ``uri``, for Ray Data readers/writers."""
    uri = normalize(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint_url(),
            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        )
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
