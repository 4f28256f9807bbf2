"""Storage on local paths and on a real S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from lesion_ray import cli, data, spec, storage
from lesion_ray.cluster import LocalCluster
from lesion_ray.settings import Settings
from lesion_ray.spec import StorageSettings
from lesion_ray.storage import StorageError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_round_trip_exists_and_delete(root: str) -> None:
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.exists(uri) and storage.is_file(uri)
    assert storage.exists(storage.join(root, "a"))  # a prefix with something under it
    assert not storage.is_file(storage.join(root, "a"))
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    storage.write_text(storage.join(root, "t.json"), '{"x": 1}')
    assert storage.read_text(storage.join(root, "t.json")) == '{"x": 1}'
    storage.delete(storage.join(root, "a"))
    assert not storage.exists(uri)
    assert storage.exists(storage.join(root, "t.json"))


def test_listing_is_complete_past_one_page(root: str) -> None:
    for i in range(1105):
        storage.write_bytes(storage.join(root, "many", f"k{i:05d}.png"), b"x")
    storage.write_bytes(storage.join(root, "many", "skip.txt"), b"x")
    files = storage.list_files(storage.join(root, "many"), suffixes=(".png",))
    assert len(files) == 1105
    assert files[0].uri.endswith("k00000.png") and files[-1].uri.endswith("k01104.png")
    assert all(f.size == 1 for f in files)


def test_a_local_listing_follows_links_once_and_keeps_broken_ones(tmp_path) -> None:
    archive, elsewhere = tmp_path / "archive", tmp_path / "disk2"
    storage.write_bytes(str(archive / "a.jpg"), b"abc")
    storage.write_bytes(str(elsewhere / "b.jpg"), b"abcd")
    (archive / "linked").symlink_to(elsewhere)  # a folder on another disk, linked in
    (archive / "again").symlink_to(elsewhere)  # the same folder twice: its files once
    (elsewhere / "loop").symlink_to(archive)  # a link back up: walked once, not forever
    (archive / "gone.jpg").symlink_to(tmp_path / "nothing")  # listed, so that its read fails as an error row
    (archive / "self.jpg").symlink_to(archive / "self.jpg")  # a link to itself, likewise
    files = {f.uri.removeprefix(f"{archive}/"): f.size for f in storage.list_files(str(archive))}
    assert files == {"a.jpg": 3, "again/b.jpg": 4, "gone.jpg": 0, "self.jpg": 0}
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(archive / "gone.jpg"))
    with pytest.raises(StorageError, match="Too many levels of symbolic links"):
        storage.read_bytes(str(archive / "self.jpg"))


def test_a_folder_that_cannot_be_read_is_listed_with_its_problem() -> None:
    # A folder nobody may read (mode 000). Root may read any folder: there the listing process drops to user
    # nobody once it has imported lesion-ray, in a folder of its own under /tmp that nobody can reach.
    top = tempfile.mkdtemp(prefix="lr-locked-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        storage.write_bytes(f"{top}/a.jpg", b"abc")
        os.mkdir(f"{top}/lost+found", mode=0o000)
        code = (f"import os, pwd, sys; sys.path.insert(0, {str(REPO)!r}); from lesion_ray import storage\n"
                "if os.geteuid() == 0:\n    nobody = pwd.getpwnam('nobody')\n"
                "    os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)\n"
                f"print([(f.uri, f.problem) for f in storage.list_files({top!r}, with_problems=True)])\n"
                f"for folder in ({top!r}, {top + '/lost+found'!r}):\n"
                "    try:\n        storage.list_files(folder)\n"
                "    except storage.StorageError as exc:\n        print(exc)")
        listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.splitlines()
        problem = "a folder that cannot be read (Permission denied): its files are not listed"
        assert listed == [repr([(f"{top}/a.jpg", None), (f"{top}/lost+found", problem)]),
                          f"cannot list {top}: {top}/lost+found: {problem}",  # where the caller cannot report it
                          f"cannot list {top}/lost+found: Permission denied"]  # the folder asked for itself
    finally:
        if os.path.isdir(f"{top}/lost+found"):
            os.chmod(f"{top}/lost+found", 0o700)  # so that its owner can remove it
        shutil.rmtree(top)
    assert data.triage(storage.FileInfo(f"{top}/lost+found", 0, "a folder that cannot be read"), 10) == (
        "skipped", "a folder that cannot be read")


def test_a_file_name_in_another_encoding_is_listed_as_an_error(tmp_path) -> None:
    # Latin-1 "Läsion.jpg", as an export from another system may name it: Python keeps the byte as a surrogate,
    # which no manifest, ledger or URI can hold. It is listed under a printable name, as an image's error.
    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"L\xe4sion.jpg"), "wb") as f:
        f.write(b"xy")
    (odd,) = [f for f in storage.list_files(str(tmp_path), with_problems=True) if f.problem]
    with pytest.raises(StorageError, match="L\\\\xe4sion.jpg: the file name is not valid UTF-8"):
        storage.list_files(str(tmp_path))
    assert (odd.uri, odd.size) == (f"{tmp_path}/L\\xe4sion.jpg", 2)
    assert data.triage(odd, max_bytes=10) == ("error", "the file name is not valid UTF-8 (another encoding's): "
                                                       "rename it")
    assert data.triage(storage.FileInfo(f"{tmp_path}/ok.jpg", 1), max_bytes=10) is None


def test_parallel_listing_returns_every_key_once(s3_bucket: str) -> None:
    folder = f"{s3_bucket}/archive"
    names = [f"ISIC_{71 * i:07d}.jpg" for i in range(1200)]  # past one page; ids up to 0085129
    names += ["ISIC_", "ISIC_0000071", "LICENSE.txt", "a-b.csv", "\u00e9t\u00e9.jpg", "zz/ISIC_0000071.jpg", "~x"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: storage.write_bytes(f"{folder}/{name}", b"x"), names))
    pages = list(storage.iter_listing_parallel(folder))
    assert sorted(f.uri for page in pages for f in page) == sorted(f"{folder}/{name}" for name in names)
    assert len(pages[0]) == 1000  # the first page at once, the rest in key ranges side by side:
    assert len(storage.split_points(folder, storage.LISTING_RANGES)) == storage.LISTING_RANGES
    assert len(pages) > 2


def test_failed_write_leaves_nothing_visible(root: str) -> None:
    uri = storage.join(root, "partial.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half of it")
        raise RuntimeError("writer died")
    assert not storage.exists(uri)
    if not storage.is_s3(uri):
        assert os.listdir(os.path.dirname(uri)) == []  # no stray temporary file either


def _race(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(0..count-1)`` in threads released together, so they really overlap."""
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        work(index)

    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(run, i) for i in range(count)]:
            future.result()  # a failure in a thread fails the test


def test_create_exclusive_has_one_winner(root: str) -> None:
    uri = storage.join(root, "claims", "1")
    winners: list[int] = []

    def claim(index: int) -> None:
        if storage.create_exclusive(uri, f"writer {index}".encode()):
            winners.append(index)

    _race(8, claim)
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()
    assert not storage.create_exclusive(uri, b"late")
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()
    if not storage.is_s3(uri):
        assert os.listdir(os.path.dirname(uri)) == ["1"]  # no temporary files left behind


def test_compare_and_swap(root: str) -> None:
    uri = storage.join(root, "pointer.json")
    assert storage.read_with_tag(uri) is None
    assert storage.replace_if_unchanged(uri, b"1", None)
    assert not storage.replace_if_unchanged(uri, b"x", None)  # "must not exist" no longer holds
    data, tag = storage.read_with_tag(uri)
    assert data == b"1"
    assert storage.replace_if_unchanged(uri, b"2", tag)
    assert not storage.replace_if_unchanged(uri, b"x", tag)  # stale tag
    assert storage.read_bytes(uri) == b"2"


def test_compare_and_swap_loses_no_update(root: str) -> None:
    uri = storage.join(root, "counter")

    def increment(_: int) -> None:
        for _ in range(5):
            while True:
                current = storage.read_with_tag(uri)
                value, tag = (int(current[0]), current[1]) if current else (0, None)
                if storage.replace_if_unchanged(uri, str(value + 1).encode(), tag):
                    break

    _race(4, increment)
    assert storage.read_bytes(uri) == b"20"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_local_files_follow_the_umask(tmp_path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "written"), b"x")
        storage.create_exclusive(str(tmp_path / "created"), b"x")
        storage.replace_if_unchanged(str(tmp_path / "swapped"), b"x", None)
    finally:
        os.umask(previous)
    for name in ("written", "created", "swapped"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_large_write_uses_multipart_and_is_atomic(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/big.bin"
    data = os.urandom(storage._MULTIPART_CHUNK + 1024)
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    with pytest.raises(RuntimeError), storage.open_write(f"{s3_bucket}/big2.bin") as f:
        f.write(data)
        raise RuntimeError("boom")
    assert not storage.exists(f"{s3_bucket}/big2.bin")


def test_missing_things_give_clear_errors(tmp_path) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_readable("s3://no-such-bucket/data")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/out")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x.png")
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.png"))
    with pytest.raises(StorageError, match="nothing found"):
        storage.check_readable(str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs://'"):
        storage.normalize("gs://bucket/x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        storage.check_writable(str(tmp_path / "file" / "out"))


def test_missing_key_in_existing_bucket(s3_bucket: str) -> None:
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(f"{s3_bucket}/nope.png")
    with pytest.raises(StorageError, match="nothing found"):
        storage.check_readable(f"{s3_bucket}/nope")
    storage.check_writable(f"{s3_bucket}/new/prefix")  # bucket exists: fine


def test_uri_forms(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/x") == str(tmp_path / "rel" / "x")
    assert storage.normalize(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert storage.join("s3://b/p/", "q", "/r.png") == "s3://b/p/q/r.png"
    assert storage.split_s3("s3://b/p/q") == ("b", "p/q")
    assert storage.basename("s3://b/p/q.png") == "q.png"
    assert storage.parent("s3://b/p/q.png") == "s3://b/p"


def test_pyarrow_filesystem_reads_what_storage_wrote(s3_bucket: str, tmp_path) -> None:
    storage.write_bytes(f"{s3_bucket}/pa/x.bin", b"abc")
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/pa/x.bin")
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"abc"
    fs, path = storage.pyarrow_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


def test_secrets_never_in_messages(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLESIONRAYTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    installed = storage.current_config()
    # Other settings than the installed ones, so that a new client reads these credentials.
    storage.configure(dataclasses.replace(installed, max_attempts=installed.max_attempts + 1))
    try:
        for action in (lambda: storage.read_bytes("s3://no-such-bucket/k"),
                       lambda: storage.check_writable("s3://no-such-bucket/k")):
            with pytest.raises(StorageError) as info:
                action()
            assert "very-secret-value-123" not in str(info.value)
            assert "AKIDLESIONRAYTEST" not in str(info.value)
    finally:
        storage.configure(installed)


def test_settings_take_the_spec_over_the_cluster_config_over_the_aws_variables(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env.example:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "env-region")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    config = LocalCluster(storage=StorageSettings(endpoint_url="http://cluster.example:9000"))
    job = spec.parse({"kind": "synth", "name": "s", "output": "out", "storage": {"region": "spec-region"}}, "test")
    assert Settings.build(config, job).storage == storage.S3Config("http://cluster.example:9000", "spec-region", 5)
    assert Settings.build().storage == storage.S3Config("http://env.example:9000", "env-region", 5)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert Settings.build().storage.max_attempts == storage.DEFAULT_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "a")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS must be a whole number of attempts .1 or more., got 'a'"):
        Settings.build()


def test_an_answer_cut_short_is_read_again_then_an_error(settings, s3_bucket, faulty_s3) -> None:
    data = bytes(range(256)) * 400
    for name in ("once.bin", "always.bin"):
        storage.write_bytes(f"{s3_bucket}/{name}", data)
    proxy = faulty_s3(failure_rate=0, cut_short={"once.bin": 1, "always.bin": 99})
    storage.configure(dataclasses.replace(settings.storage, endpoint_url=proxy.url, max_attempts=3))
    try:
        assert storage.read_bytes(f"{s3_bucket}/once.bin") == data
        with pytest.raises(StorageError, match=re.escape(f"cannot read {s3_bucket}/always.bin at {proxy.url}: the "
                                                         "answer was cut short 3 times")):
            storage.read_bytes(f"{s3_bucket}/always.bin")
    finally:
        storage.configure(settings.storage)
    assert [sum(name in path for path in proxy.faulted) for name in ("once.bin", "always.bin")] == [1, 3]


def test_a_local_read_error_is_a_storage_error() -> None:
    # Any OSError (an I/O error, a stale NFS handle; here a socket, which cannot be opened: ENXIO) is the file's
    # failure, told as a StorageError, so that it becomes that image's error row instead of failing the job.
    import socket

    with tempfile.TemporaryDirectory(prefix="lr-") as folder, socket.socket(socket.AF_UNIX) as server:
        path = f"{folder}/socket"  # short: a socket's path must stay under ~107 characters
        server.bind(path)
        with pytest.raises(StorageError, match=re.escape(f"cannot read {path}: No such device or address")):
            storage.read_bytes(path)


def test_boto3_and_pyarrow_use_the_installed_settings(settings) -> None:
    down = storage.S3Config(endpoint_url="http://127.0.0.1:1", region="eu-west-3", max_attempts=1)
    storage.configure(down)
    try:
        with pytest.raises(StorageError, match=r"at http://127\.0\.0\.1:1"):
            storage.read_bytes("s3://bucket/key")
        fs, _ = storage.pyarrow_filesystem("s3://bucket/key")
        _, (options, *_) = fs.__reduce__()
        assert (options["endpoint_override"], options["region"]) == ("http://127.0.0.1:1", "eu-west-3")
    finally:
        storage.configure(settings.storage)


def test_preparing_a_job_leaves_the_environment_alone(tmp_path, settings) -> None:
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"kind": "local", "registry": str(tmp_path / "registry"),
                                            "env_vars": {"LESION_RAY_EXAMPLE": "1"},
                                            "storage": {"endpoint_url": settings.storage.endpoint_url}}))
    job_file = tmp_path / "synth.yaml"
    job_file.write_text(yaml.safe_dump({"kind": "synth", "name": "s", "output": str(tmp_path / "out"),
                                        "storage": {"region": "eu-west-3"}}))
    before = dict(os.environ)
    try:
        _, _, job_settings = cli.prepare(str(job_file), str(cluster_file), [])
        assert dict(os.environ) == before
        assert job_settings.registry == str(tmp_path / "registry")
        assert job_settings.storage == storage.S3Config(settings.storage.endpoint_url, "eu-west-3")
        assert storage.current_config() == job_settings.storage  # installed in this process, for its own I/O
        # For a driver started elsewhere: the env_vars and the storage settings as the AWS variables.
        assert job_settings.job_environment() == {"AWS_ENDPOINT_URL_S3": settings.storage.endpoint_url,
                                                  "AWS_ENDPOINT_URL": settings.storage.endpoint_url,
                                                  "AWS_DEFAULT_REGION": "eu-west-3", "AWS_MAX_ATTEMPTS": "8",
                                                  "LESION_RAY_EXAMPLE": "1"}
    finally:
        storage.configure(settings.storage)
