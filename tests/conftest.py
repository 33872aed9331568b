"""Shared fixtures: a module-scoped local Ray, a moto S3 server on loopback, a 5xx-injecting proxy."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FACESYNTH_PROGRESS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module: 2 CPUs and 2 logical GPUs (scheduling only)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


class MotoServer:
    """A real moto S3 server process on 127.0.0.1 (real HTTP for boto3 and pyarrow)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def env(self, endpoint: str | None = None) -> dict:
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server with the AWS variables pointing at it; yields ``s3://bucket``."""
    import boto3

    from facesynth import storage

    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    storage._s3_filesystem.cache_clear()
    name = f"test-{random.getrandbits(40):x}"
    boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    yield f"s3://{name}"
    storage._s3_filesystem.cache_clear()


@pytest.fixture
def s3_atomic_bucket(s3_bucket, moto_server, monkeypatch):
    """``s3_bucket`` reached through a proxy that forwards one request at a time, for tests of concurrent
    conditional writes (see :class:`FaultProxy`); subprocesses started by the test inherit it."""
    proxy = FaultProxy(moto_server.port, fail_rate=0.0, atomic=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield s3_bucket
    proxy.stop()


class FaultProxy:
    """HTTP proxy to the moto server that answers 503 SlowDown to a fraction of requests.

    ``atomic``: forward one request at a time. moto checks ``If-None-Match``/``If-Match`` and then stores
    in two steps, so two concurrent conditional PUTs can both succeed; S3 decides them atomically.
    """

    def __init__(self, target_port: int, fail_rate: float, seed: int = 0, *, atomic: bool = False):
        self.rng = random.Random(seed)
        self.fail_rate = fail_rate
        self.lock = threading.Lock()
        self.forwarding = threading.Lock() if atomic else contextlib.nullcontext()
        self.failed = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._read_body()
                with proxy.lock:
                    fail = proxy.rng.random() < proxy.fail_rate
                    proxy.failed += fail
                    proxy.forwarded += not fail
                if fail:
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.send_header("Content-Type", "application/xml")
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect")
                }
                headers["Content-Length"] = str(len(body))
                with proxy.forwarding:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
