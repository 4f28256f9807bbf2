"""Shared fixtures: a real S3 endpoint (moto server on loopback), the job settings that point at it,
and one local Ray per session whose workers get those settings as a job's workers do.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable

import pytest

from lesion_ray import cluster, storage
from lesion_ray.cluster import LocalCluster
from lesion_ray.settings import Settings
from lesion_ray.spec import StorageSettings
from lesion_ray.testing.loopback import LoopbackCluster, free_port

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher for each run: the suite is
# many short runs on 2 cores, so it polls every 0.5 s and goes without the watcher (no node is ever drained here).
# Set before any Ray starts; Train hands both to its controller and workers, and the commands tests run inherit them.
os.environ.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that do not use the session's Ray (``ray_local``) run first, each group in file order: from its first
    use until the session ends, that Ray's idle workers take about 1 % of a core each (measured on 2 cores), CPU
    the tests that start Ray processes of their own (command runs, loopback clusters) would otherwise go without."""
    items.sort(key=lambda item: "ray_local" in item.fixturenames)  # a stable sort keeps each group's order


@pytest.fixture(scope="session", autouse=True)
def s3_endpoint() -> str:
    """URL of a moto S3 server on loopback. The session's environment is a user's shell that exports fake
    credentials and this endpoint in the AWS variables, for the commands tests run as a user does.

    Autouse: no test can reach AWS.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in captured stderr
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
    )
    yield url
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def settings(s3_endpoint: str) -> Settings:
    """The settings the CLI builds for a job on a local cluster config that names the moto endpoint, installed
    in this process as the CLI installs them (autouse: before any test touches S3)."""
    job_settings = Settings.build(LocalCluster(storage=StorageSettings(endpoint_url=s3_endpoint)))
    storage.configure(job_settings.storage)
    return job_settings


@pytest.fixture(scope="session")
def new_bucket(s3_endpoint: str) -> Callable[[], str]:
    """Creates a fresh, empty bucket on each call; returns ``s3://<bucket>`` (for fixtures wider than a test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def create() -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return create


@pytest.fixture
def s3_bucket(new_bucket: Callable[[], str]) -> str:
    """A fresh, empty bucket; returns ``s3://<bucket>``."""
    return new_bucket()


@pytest.fixture(scope="session")
def ray_local(settings: Settings):
    """One local Ray for the session (started on first use): more logical CPUs than the 2 physical
    cores, progress bars off, and the runtime_env a job started by the CLI has."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to a `ray start` cluster another test left running
            num_cpus=8,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=cluster.runtime_env(settings),
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (Debian's) under Selenium, its console log kept; skips where it is not installed."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def make_isic():
    """Writes a small synthetic ISIC layout in-process (faster here than Ray tasks); returns its URI."""
    from lesion_ray import spec, synth

    def write(out: str, num_images: int = 60, tasks: tuple[int, ...] = (1,)) -> str:
        config = spec.from_dict(synth.SynthSpec, {
            "kind": "synth", "name": "synth", "output": out, "num_images": num_images, "validation_images": 0,
            "width": [64, 96], "tasks": list(tasks), "max_hairs": 2,
        }, "test")
        for index in range(num_images):
            synth.write_image(config, index)
        return out

    return write


@pytest.fixture(scope="module")
def ray_processes(s3_endpoint: str):
    """A real `ray start` head with 4 CPUs and token authentication (add workers with add_worker)."""
    with LoopbackCluster(head_cpus=4) as cluster:
        yield cluster


class FaultyS3Proxy:
    """A real HTTP hop between S3 clients and the moto server that answers some requests itself with
    500 InternalError / 503 ServiceUnavailable: ``failure_rate`` of all requests, spread evenly (one in
    every 1/rate, so a test knows how many faults its requests met), and every request for an object
    whose key holds one of ``always_fail`` (its path, not a listing's query). ``cut_short`` maps names to how
    many GETs of an object whose key holds one get only half the body they announce, the connection then closed
    (as a reset would). ``faulted`` records the paths it answered with a fault or cut short, ``forwarded``
    (method, path) of the rest."""

    def __init__(self, upstream: str, failure_rate: float, always_fail: tuple[str, ...] = (),
                 cut_short: dict[str, int] | None = None) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.failure_rate, self.always_fail, self.cut_short = failure_rate, always_fail, dict(cut_short or {})
        self.faulted: list[str] = []
        self.forwarded: list[tuple[str, str]] = []
        self._due, self._lock = 0.0, threading.Lock()  # failures owed to the requests seen so far
        target = urlparse(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                """The request body as it came: a chunked one (the AWS C++ SDK's uploads, under pyarrow) with
                its chunk lines and trailers, to be forwarded the same way."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    if int(line.split(b";")[0].strip() or b"0", 16) == 0:
                        break
                    raw += self.rfile.read(int(line.split(b";")[0].strip(), 16) + 2)  # the data and its CRLF
                while line not in (b"\r\n", b"\n", b""):  # trailers, then an empty line
                    line = self.rfile.readline()
                    raw += line
                return raw

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._fault(self.path)
                if fault:
                    status, code = fault
                    error = f"<Error><Code>{code}</Code><Message>injected fault</Message></Error>".encode()
                    self._answer(status, {"Content-Type": "application/xml"}, error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    upstream_conn.request(self.command, self.path, body=body, headers=headers)
                    response = upstream_conn.getresponse()
                    payload = response.read()
                    keep = {k: v for k, v in response.getheaders()
                            if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                    if self.command == "HEAD":  # a HEAD answer declares the object's length, without a body
                        keep["Content-Length"] = response.getheader("Content-Length", "0")
                    if self.command == "GET" and proxy._cut(self.path):
                        keep["Content-Length"] = str(len(payload))
                        self.close_connection = True
                        self._answer(response.status, keep, payload[: len(payload) // 2])
                        return
                    self._answer(response.status, keep, payload)
                finally:
                    upstream_conn.close()
                with proxy._lock:
                    proxy.forwarded.append((self.command, self.path))

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _fault(self, path: str) -> tuple[int, str] | None:
        """The (status, S3 error code) to answer ``path`` with, or None to forward it."""
        with self._lock:
            self._due += self.failure_rate
            if self._due >= 1:
                self._due -= 1
            elif not any(name in path.split("?", 1)[0] for name in self.always_fail):
                return None
            self.faulted.append(path)
            return [(500, "InternalError"), (503, "ServiceUnavailable")][len(self.faulted) % 2]

    def _cut(self, path: str) -> bool:
        """Whether to cut this GET's body short (and count it)."""
        with self._lock:
            name = next((n for n, left in self.cut_short.items() if left and n in path.split("?", 1)[0]), None)
            if name:
                self.cut_short[name] -= 1
                self.faulted.append(path)
            return name is not None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(s3_endpoint: str):
    """Starts :class:`FaultyS3Proxy` instances in front of the moto server; stops them after the test."""
    proxies: list[FaultyS3Proxy] = []

    def start(failure_rate: float, always_fail: tuple[str, ...] = (),
              cut_short: dict[str, int] | None = None) -> FaultyS3Proxy:
        proxies.append(FaultyS3Proxy(s3_endpoint, failure_rate, always_fail, cut_short))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()
