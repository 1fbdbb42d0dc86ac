"""A real S3 server for tests: moto's standalone server on 127.0.0.1 with IAM authentication switched on,
and a small HTTP proxy in front of it that injects throttling, 5xx errors and delays.

Requests are signed and checked: credentials that moto's IAM does not know are rejected
(``InvalidAccessKeyId``), and a user without an S3 policy is denied (``AccessDenied``), exactly as on AWS.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.request import Request, urlopen

import pytest

REGION = "us-east-1"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` in a subprocess; IAM auth on from the moment an admin user exists."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError("moto server did not start")
                    time.sleep(0.1)
            # Every request is unauthenticated until reset-auth; make an admin, then switch auth on for good.
            self.admin = self._create_user("admin", ALLOW_ALL, authenticated=False)
            req = Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                          headers={"Content-Type": "text/plain"})
            urlopen(req, timeout=10).read()
        except BaseException:
            self.stop()
            raise

    def client(self, service: str, creds: Credentials | None = None, endpoint: str | None = None):
        import boto3

        creds = creds or self.admin
        return boto3.client(service, endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=creds.access_key_id, aws_secret_access_key=creds.secret_access_key)

    def user(self, name: str, policy: dict | None = ALLOW_S3) -> Credentials:
        """A new IAM user with ``policy`` (None: no permissions at all) and its access key."""
        return self._create_user(name, policy, authenticated=True)

    def _create_user(self, name: str, policy: dict | None, authenticated: bool) -> Credentials:
        import boto3

        iam = self.client("iam") if authenticated else boto3.client(
            "iam", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap")
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def aws_env(creds: Credentials, endpoint: str) -> dict[str, str]:
    """Environment for a process that should reach the test server through the standard AWS variables,
    isolated from any real AWS configuration on the machine."""
    return {
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }


def scrubbed_environ() -> dict[str, str]:
    """os.environ without any AWS_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int = 503
    code: str = "SlowDown"
    times: int = 1
    after_forward: bool = False  # forward first (the request takes effect), then answer with the fault
    delay: float = 0.0  # seconds to wait before forwarding; with status 0 the request is not failed
    skip: int = 0  # let this many matching requests through untouched first
    hold: threading.Event | None = None  # block the request until this event is set (then forward it)
    hits: int = 0
    seen: int = 0


@dataclass
class Seen:
    method: str
    path: str
    status: int
    injected: bool
    at: float = 0.0
    body: bytes | None = None  # the request body, for paths matching the proxy's ``keep_bodies``


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` byte for byte (signatures stay valid)
    and applies the first matching :class:`Fault` that still has ``times`` left."""

    upstream: str
    keep_bodies: str | None = None
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0  # requests being handled: a delayed one is still forwarded after its client died
        host, port = self.upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy._busy += 1
                try:
                    self._forward()
                finally:
                    with proxy._lock:
                        proxy._busy -= 1

            def _forward(self) -> None:
                body = self._read_body()
                fault = proxy._match(self.command, self.path)
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.hold is not None:
                    fault.hold.wait(300)
                injected = fault is not None and fault.status > 0
                if injected and not fault.after_forward:
                    proxy._record(self.command, self.path, fault.status, True, body)
                    self._reply_fault(fault)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in ("connection", "keep-alive", "proxy-connection", "expect"):
                            conn.putheader(k, v)
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if injected:
                    proxy._record(self.command, self.path, fault.status, True, body)
                    self._reply_fault(fault)
                    return
                proxy._record(self.command, self.path, resp.status, False, body)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else resp.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = bytearray()
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            # trailers until the empty line
                            while chunk not in (b"\r\n", b""):
                                chunk = self.rfile.readline()
                                raw += chunk
                            return bytes(raw)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply_fault(self, fault: Fault) -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                        f"<Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>").encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)  # a killed client is not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, method: str, pattern: str, **kw) -> Fault:
        """Fail (or delay) the next ``times`` requests whose method is ``method`` and whose path (with the
        query) matches the regular expression ``pattern``."""
        fault = Fault(method, re.compile(pattern), **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no request is being handled (those of a killed client included: once read, a delayed
        request is still forwarded), so that what the store holds stops changing."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._busy:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fault proxy still handles {self._busy} requests after {timeout} s")
            time.sleep(0.05)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.seen.clear()

    def count(self, method: str, pattern: str, injected: bool | None = None) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for s in self.seen if s.method == method and rx.search(s.path)
                       and (injected is None or s.injected == injected))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def successes(self, method: str, pattern: str) -> list[Seen]:
        rx = re.compile(pattern)
        with self._lock:
            return [s for s in self.seen if s.method == method and rx.search(s.path) and 200 <= s.status < 300]

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method == method and f.pattern.search(path) and f.hits < f.times:
                    f.seen += 1
                    if f.seen <= f.skip:
                        continue
                    f.hits += 1
                    return f
        return None

    def _record(self, method: str, path: str, status: int, injected: bool, body: bytes) -> None:
        keep = self.keep_bodies is not None and re.search(self.keep_bodies, path)
        with self._lock:
            self.seen.append(Seen(method, path, status, injected, time.monotonic(), body if keep else None))


@pytest.fixture(scope="module")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(moto_server):
    proxy = FaultProxy(moto_server.endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def s3_user(moto_server) -> Credentials:
    """An IAM user allowed s3:* (the job's credentials in these tests)."""
    return moto_server.user("reembed-job")


@pytest.fixture
def s3_env(moto_server, s3_user, monkeypatch):
    """The standard AWS variables pointing this process at the test server with ``s3_user``'s keys."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in aws_env(s3_user, moto_server.endpoint).items():
        monkeypatch.setenv(k, v)
    yield moto_server


_bucket_seq = iter(range(10_000))


def new_bucket(server: MotoServer, prefix: str = "reembed") -> str:
    name = f"{prefix}-{os.getpid()}-{next(_bucket_seq)}"
    server.client("s3").create_bucket(Bucket=name)
    return name
