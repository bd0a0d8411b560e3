"""A real S3-compatible server for the s3 tier's tests and benchmark.

``MotoServer`` runs moto's server (``python -m moto.server``) as a separate process
on a free port of 127.0.0.1, so a test can kill it and start it again on the same
port. ``FaultProxy`` is a real HTTP proxy in front of it that can answer 503
SlowDown or 500, cut a body short, or stall, for a chosen number of requests: the
client under test talks HTTP to it exactly as to S3. Nothing here mocks boto3.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BUCKET = "kvbm-test"
ACCESS_KEY = "kvbm-test-access"
SECRET_KEY = "kvbm-test-secret-do-not-print"
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server in a child process on ``127.0.0.1:port``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, bucket: str | None = BUCKET) -> None:
        """Start the process, wait until it answers, create ``bucket``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} on port {self.port}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/")
                c.getresponse().read()
                c.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on port {self.port} in {timeout}s") from None
                time.sleep(0.05)
        if bucket:
            self.client().create_bucket(Bucket=bucket)

    def stop(self) -> None:
        """Kill the process (as a crash would) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self, endpoint: str | None = None) -> Any:
        """A plain boto3 client for this server (to inspect or tamper with objects)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint or self.url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
        )

    def tier_config(self, endpoint: str | None = None, **overrides: Any) -> dict[str, Any]:
        """An s3 tier entry pointing at this server (or at ``endpoint``)."""
        cfg: dict[str, Any] = {
            "type": "s3", "bucket": BUCKET, "prefix": "t", "endpoint_url": endpoint or self.url,
            "region": REGION, "addressing_style": "path",
            "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
            "max_concurrency": 4, "connect_timeout_s": 1.0, "read_timeout_s": 2.0,
            "retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
            "breaker_failures": 3, "breaker_cooldown_s": 0.2, "breaker_max_cooldown_s": 0.4,
        }
        cfg.update(overrides)
        return cfg


@dataclass
class Fault:
    """What the proxy does to the next ``count`` matching requests (None: all)."""

    kind: str  # "slowdown" | "error500" | "truncate" | "delay"
    methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE")
    count: int | None = None
    delay_s: float = 0.0


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "expect", "host"}


class FaultProxy:
    """An HTTP/1.1 proxy on a free port of 127.0.0.1 in front of ``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fault: Fault | None = None
        self.faulted = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                try:
                    proxy._handle(self)
                except OSError:
                    # The client gave up (its timeout) or the server went away.
                    self.close_connection = True

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, fault: Fault | None) -> None:
        with self._lock:
            self.fault = fault
            self.faulted = 0

    def _take(self, method: str) -> Fault | None:
        with self._lock:
            f = self.fault
            if f is None or method not in f.methods:
                return None
            if f.count is not None and self.faulted >= f.count:
                return None
            self.faulted += 1
            return f

    def _forward(
        self, h: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to the real server: its status, reason, end-to-end headers
        and body (OSError when it is down)."""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        up = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            up.request(h.command, h.path, body=body, headers=headers)
            r = up.getresponse()
            data = r.read()
            rheaders = [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP]
            return r.status, r.reason, rheaders, data
        finally:
            up.close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        fault = self._take(h.command)
        if fault is not None and fault.kind in ("slowdown", "error500"):
            status, code = (503, "SlowDown") if fault.kind == "slowdown" else (500, "InternalError")
            msg = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                   f"<Message>injected</Message></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(msg)
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay_s)
        try:
            status, _, rheaders, data = self._forward(h, body)
        except OSError:
            h.send_error(502)  # upstream down: what a real load balancer answers
            return
        h.send_response(status)
        for k, v in rheaders:
            if k.lower() != "content-length":
                h.send_header(k, v)
        full = len(data) if h.command != "HEAD" else int(dict(
            (k.lower(), v) for k, v in rheaders).get("content-length", 0))
        h.send_header("Content-Length", str(full))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault is not None and fault.kind == "truncate" and data:
            # Promise the whole body, send half, hang up: a connection lost mid-body.
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
