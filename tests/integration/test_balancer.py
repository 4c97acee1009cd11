"""The balancer as a real process between real sockets: a route publisher (PUB +
ROUTER answering snapshot requests) in a thread, gunicorn backends on 127.0.0.2,
and `python -m balancer` on a free port. No mocks; every process started here is
stopped here by its PID (gunicorn by the process group it was started in)."""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from cli import localplatform
from messaging import channels
from messaging.clone import ClonePublisher
from messaging.envelope import Message, recv, send

ROOT = Path(__file__).resolve().parents[2]
# the interpreter running the tests (a worktree has no .venv of its own)
PY = sys.executable
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
BACKEND_HOST = "127.0.0.2"

APP = textwrap.dedent('''
    import os, time

    NAME = os.environ["APP_NAME"]
    REQLOG = os.environ["REQLOG"]

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        with open(REQLOG, "a") as f:
            f.write(f"{environ['REQUEST_METHOD']} {path}\\n")
        if path == "/echo":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/sleep":
            time.sleep(float(environ.get("QUERY_STRING") or "1"))
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return (b"part%d\\n" % i for i in range(5))
        if path == "/nocontent":
            start_response("204 No Content", [])
            return [b""]
        seen = " ".join(f"{k}={environ.get(k, '-')}" for k in (
            "HTTP_HOST", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO",
            "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PORT", "HTTP_X_REQUEST_ID",
            "HTTP_CONNECTION", "HTTP_KEEP_ALIVE", "HTTP_X_SECRET", "HTTP_TE",
            "HTTP_X_BERTH_STATIC"))
        body = f"app={NAME} pid={os.getpid()} {seen}\\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
''')


@pytest.fixture(autouse=True)
def _bounded():
    """Every test ends within 90 s, however it hangs."""
    def expire(signum, frame):
        raise TimeoutError("test took longer than 90 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(90)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def free_port(host: str = "127.0.0.1") -> int:
    return localplatform.free_port(host)


def wait_port(host: str, port: int, timeout: float = 20.0,
              proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open in {timeout} s")


class Publisher:
    """The controller's side of route replication, in one thread: every socket is
    used only there. Also collects access logs from a PULL."""

    def __init__(self) -> None:
        self.routes_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.snapshot_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.logs_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.clone = ClonePublisher()
        self.changes: queue.Queue = queue.Queue()
        self.logs: list = []
        self.snapshots_served = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def set(self, app: str, route: dict | None) -> None:
        done = threading.Event()
        self.changes.put((app, route, done))
        assert done.wait(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        pub = channels.bind(ctx, "routes", self.routes_endpoint)
        router = channels.bind(ctx, "routes_snapshot", self.snapshot_endpoint)
        pull = channels.bind(ctx, "logs", self.logs_endpoint)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        self._ready.set()
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(20):
                    ident, msg = recv(sock)
                    if sock is router and msg.type == "snapshot_request":
                        send(router, self.clone.snapshot(), identity=ident)
                        self.snapshots_served += 1
                    elif sock is pull and msg.type == "log_batch":
                        # one message per 100 ms: each entry reads as a `log` message
                        self.logs.extend(Message("log", dict(entry), id=msg.id,
                                                 sender=msg.sender, ts=msg.ts)
                                         for entry in msg["entries"])
                    elif sock is pull:
                        self.logs.append(msg)
                while not self.changes.empty():
                    app, route, done = self.changes.get()
                    update = self.clone.set(app, route)
                    if update is not None:
                        send(pub, update)
                    done.set()
                if time.monotonic() >= next_tick:
                    send(pub, self.clone.tick())
                    next_tick = time.monotonic() + 0.2
        finally:
            for sock in (pub, router, pull):
                sock.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def write_app(path: Path) -> None:
    """The test app's module, written once and atomically. Rewriting it in place
    for every backend raced a gunicorn worker importing it: a worker that read the
    file truncated would find no `app` and fail to boot, and its gunicorn exit, so
    one of two backends could go quietly dead (the likely cause of the two-backends
    kill test's rare wait in vain for load on both)."""
    if path.exists() and path.read_text() == APP:
        return
    part = path.with_name(path.name + ".part")
    part.write_text(APP)
    os.replace(part, path)


class Backend:
    """One gunicorn serving the test app as `name` on 127.0.0.2."""

    def __init__(self, tmp: Path, name: str, worker: str = "gthread") -> None:
        self.name = name
        self.port = free_port(BACKEND_HOST)
        self.reqlog = tmp / f"{name}-{self.port}.log"
        self.reqlog.write_text("")
        write_app(tmp / "berthtestapp.py")
        env = dict(os.environ, APP_NAME=name, REQLOG=str(self.reqlog))
        self.proc = subprocess.Popen(
            [GUNICORN, "--bind", f"{BACKEND_HOST}:{self.port}", "--no-control-socket",
             "--workers", "1", "--worker-class", worker, "--threads", "8",
             "--keep-alive", "5", "--chdir", str(tmp), "berthtestapp:app"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_port(BACKEND_HOST, self.port, proc=self.proc)

    @property
    def entry(self) -> dict:
        return {"id": f"{self.name}-{self.port}", "address": BACKEND_HOST,
                "port": self.port}

    def requests(self) -> list[str]:
        return self.reqlog.read_text().splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the group this test started
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class BalancerProc:
    def __init__(self, tmp: Path, pub: Publisher, **settings) -> None:
        self.port = free_port()
        conf = {"host_id": "bal-test", "listen_host": "127.0.0.1",
                "listen_port": self.port, "routes_endpoint": pub.routes_endpoint,
                "routes_snapshot_endpoint": pub.snapshot_endpoint,
                "logs_endpoint": pub.logs_endpoint, "snapshot_timeout": 0.5,
                "log_level": "debug", **settings}
        path = tmp / f"balancer-{self.port}.yaml"
        path.write_text("balancer:\n" + "".join(f"  {k}: {v}\n" for k, v in conf.items()))
        self.stderr = tmp / f"balancer-{self.port}.log"
        self._err = open(self.stderr, "wb")
        self.proc = subprocess.Popen([PY, "-m", "balancer", "--config", str(path)],
                                     cwd=ROOT, stdout=self._err, stderr=self._err)
        wait_port("127.0.0.1", self.port, proc=self.proc)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode


# -- a tiny HTTP/1.1 client that shows exactly what went over the wire ------------------

class Client:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self, method: str = "GET") -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a response head: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if status < 200 and status != 101:
            return status, headers, b""
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError("short body")
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, headers, body
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    assert self._fill()
                line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(line, 16)
                while len(self.buf) < size + 2:
                    assert self._fill()
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    return status, headers, body
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b"" and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def get(port: int, host: str, path: str = "/", headers: str = "") -> tuple[int, dict, bytes]:
    c = Client(port)
    try:
        c.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
               .encode())
        return c.response()
    finally:
        c.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def wait_routed(port: int, host: str, expect: int = 200) -> None:
    wait_for(lambda: get(port, host)[0] == expect, what=f"{host} -> {expect}")


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("balancer")


@pytest.fixture(scope="module")
def publisher():
    pub = Publisher()
    yield pub
    pub.close()


@pytest.fixture(scope="module")
def backends(tmp, publisher):
    alpha, beta = Backend(tmp, "alpha"), Backend(tmp, "beta")
    publisher.set("alpha", {"hosts": ["alpha.localhost", "www.alpha.example"],
                            "backends": [alpha.entry], "reason": ""})
    publisher.set("beta", {"hosts": ["beta.localhost"], "backends": [beta.entry],
                           "reason": ""})
    publisher.set("idle", {"hosts": ["idle.localhost"], "backends": [],
                           "reason": "no web process is running; scale it up with "
                                     "`berth scale web=1`"})
    yield {"alpha": alpha, "beta": beta}
    alpha.stop()
    beta.stop()


# every test that starts a balancer runs once per engine (and per asyncio loop)
ENGINES = {"eventlet": {"engine": "eventlet"},
           "asyncio-uvloop": {"engine": "asyncio", "uvloop": "true"},
           "asyncio-stdlib": {"engine": "asyncio", "uvloop": "false"}}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request) -> dict:
    if request.param == "asyncio-uvloop":
        pytest.importorskip("uvloop")
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def balancer(tmp, publisher, backends, engine):
    """Started after the publisher already holds routes: it must converge."""
    bal = BalancerProc(tmp, publisher, header_timeout=1.0, response_timeout=2.0,
                       max_header_bytes=8192, **engine)
    wait_routed(bal.port, "alpha.localhost")
    yield bal
    assert bal.stop() == 0


# -- tests ------------------------------------------------------------------------------

def test_routes_by_host_and_sets_forwarded_headers(balancer, backends):
    status, headers, body = get(balancer.port, "alpha.localhost", "/",
                                "X-Request-ID: trace-123\r\nX-Forwarded-For: 6.6.6.6\r\n")
    assert status == 200
    text = body.decode()
    assert "app=alpha" in text
    assert "HTTP_X_FORWARDED_FOR=127.0.0.1 " in text
    assert "HTTP_X_FORWARDED_PROTO=http" in text
    assert "HTTP_X_FORWARDED_HOST=alpha.localhost" in text
    assert f"HTTP_X_FORWARDED_PORT={balancer.port}" in text
    assert "HTTP_X_REQUEST_ID=trace-123" in text
    assert headers["x-request-id"] == "trace-123"
    assert "app=beta" in get(balancer.port, "beta.localhost")[2].decode()
    # case and port do not matter; a second host of the same app works
    assert "app=alpha" in get(balancer.port, "WWW.Alpha.Example:8080")[2].decode()


def test_generates_request_id(balancer):
    _, headers, body = get(balancer.port, "alpha.localhost")
    rid = headers["x-request-id"]
    assert len(rid) >= 16 and f"HTTP_X_REQUEST_ID={rid}" in body.decode()


def test_hop_by_hop_headers_are_not_forwarded(balancer):
    _, _, body = get(balancer.port, "alpha.localhost", "/",
                     "Connection: X-Secret\r\nX-Secret: s3\r\nKeep-Alive: 5\r\nTE: trailers\r\n")
    text = body.decode()
    assert "HTTP_X_SECRET=-" in text and "HTTP_KEEP_ALIVE=-" in text
    assert "HTTP_TE=-" in text


def test_unknown_host_is_404_naming_the_host(balancer):
    status, headers, body = get(balancer.port, "nosuch.localhost")
    assert status == 404
    assert b"nosuch.localhost" in body and headers["content-type"].startswith("text/html")
    status, headers, body = get(balancer.port, "nosuch.localhost", "/",
                                "Accept: application/json\r\n")
    assert status == 404 and headers["content-type"] == "application/json"
    assert b"nosuch.localhost" in body and b'"hint"' in body


def test_app_without_backends_is_503_with_reason(balancer):
    status, _, body = get(balancer.port, "idle.localhost")
    assert status == 503
    assert b"berth scale web=1" in body and b"idle" in body


def test_keep_alive_serves_several_requests_on_one_socket(balancer, backends):
    c = Client(balancer.port)
    try:
        for _ in range(3):
            c.send(b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
            status, headers, body = c.response()
            assert status == 200 and b"app=alpha" in body
            assert headers["connection"] == "keep-alive"
        # pipelined: three at once, answered in order
        c.send(b"GET /a HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n"
               b"GET /b HTTP/1.1\r\nHost: beta.localhost\r\n\r\n"
               b"GET /c HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
        apps = [c.response()[2].split()[0] for _ in range(3)]
        assert apps == [b"app=alpha", b"app=beta", b"app=alpha"]
        # HTTP/1.0 without keep-alive is closed after the response
        c.send(b"GET / HTTP/1.0\r\nHost: alpha.localhost\r\n\r\n")
        status, headers, _ = c.response()
        assert status == 200 and headers["connection"] == "close"
        assert c.closed()
    finally:
        c.close()


def test_one_megabyte_post_is_streamed_and_echoed(balancer):
    body = os.urandom(1 << 20)
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: alpha.localhost\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body))
        c.send(body)
        status, _, echoed = c.response()
        assert status == 200
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
        # the connection is still good afterwards
        c.send(b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
        assert c.response()[0] == 200
    finally:
        c.close()


def test_chunked_request_body(balancer):
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: alpha.localhost\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n"
               b"GET / HTTP/1.1\r\nHost: beta.localhost\r\n\r\n")
        status, _, echoed = c.response()
        assert status == 200 and echoed == b"hello world"
        assert c.response()[2].startswith(b"app=beta")
    finally:
        c.close()


def test_expect_continue_is_forwarded(balancer):
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: 4\r\n"
               b"Expect: 100-continue\r\n\r\n")
        status, _, _ = c.response()
        assert status == 100
        c.send(b"ping")
        status, _, body = c.response()
        assert status == 200 and body == b"ping"
    finally:
        c.close()


def test_streamed_response_and_bodiless_statuses(balancer):
    status, _, body = get(balancer.port, "alpha.localhost", "/stream")
    assert status == 200 and body == b"".join(b"part%d\n" % i for i in range(5))
    c = Client(balancer.port)
    try:
        c.send(b"HEAD / HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n"
               b"GET /nocontent HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n"
               b"GET /stream HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
        status, headers, _ = c.response("HEAD")
        assert status == 200 and int(headers["content-length"]) > 0
        assert c.response()[0] == 204
        status, headers, body = c.response()
        assert headers["transfer-encoding"] == "chunked" and body.startswith(b"part0")
    finally:
        c.close()


SMUGGLES = [
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: 35\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: 0\r\n"
    b"Content-Length: 44\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    # TE.TE: two Transfer-Encoding fields, one the backend might ignore
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
    b"Host: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: \x0bchunked\r\n"
    b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n"
    b" identity\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer_Encoding: chunked\r\n"
    b"Content-Length: 0\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
    b"Host: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
    b"Host: alpha.localhost\r\n\r\n",
    # chunk-size tricks: overflow, 0x prefix, negative, size with spaces, bare LF
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0x0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-1\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0 \r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcdef\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    # CL tricks: a sign, a list that differs
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: +44\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: 0, 44\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n",
]


@pytest.mark.parametrize("attempt", SMUGGLES)
def test_smuggling_attempt_is_400_and_backend_sees_one_request(balancer, backends,
                                                               attempt):
    alpha = backends["alpha"]
    before = len(alpha.requests())
    c = Client(balancer.port)
    try:
        c.send(b"GET /first HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n" + attempt)
        assert c.response()[0] == 200
        assert c.response()[0] == 400
        assert c.closed()
    finally:
        c.close()
    # a later request, answered by the same backend, marks how far it has read: a
    # smuggled request would have reached it before this one
    assert get(balancer.port, "alpha.localhost", "/after")[0] == 200
    wait_for(lambda: "GET /after" in alpha.requests()[before:], what="GET /after logged")
    assert alpha.requests()[before:] == ["GET /first", "GET /after"]


def test_bad_heads(balancer):
    c = Client(balancer.port)       # 431: a head past max_header_bytes
    try:
        c.send(b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\nX-Big: " + b"a" * 9000 +
               b"\r\n\r\n")
        assert c.response()[0] == 431
    finally:
        c.close()
    c = Client(balancer.port)       # 408: a head not finished within header_timeout
    try:
        started = time.monotonic()
        c.send(b"GET / HTTP/1.1\r\nHost: alpha.local")
        assert c.response()[0] == 408
        assert time.monotonic() - started < 5
    finally:
        c.close()
    for raw in (b"GET / HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\nX: a\r\n b\r\n\r\n"):
        c = Client(balancer.port)
        try:
            c.send(raw)
            assert c.response()[0] == 400
        finally:
            c.close()


def test_backend_refusing_connections_is_502(tmp, balancer, publisher):
    dead = {"id": "dead", "address": BACKEND_HOST, "port": free_port(BACKEND_HOST)}
    publisher.set("dead", {"hosts": ["dead.localhost"], "backends": [dead],
                           "reason": ""})
    wait_for(lambda: get(balancer.port, "dead.localhost")[0] != 404, what="dead route")
    status, _, body = get(balancer.port, "dead.localhost")
    assert status == 502 and b"dead" in body


def test_slow_backend_is_504(balancer):
    started = time.monotonic()
    status, _, body = get(balancer.port, "alpha.localhost", "/sleep?4")
    assert status == 504 and b"in time" in body
    assert time.monotonic() - started < 4


def test_access_log_lines_are_pushed(balancer, publisher):
    get(balancer.port, "beta.localhost", "/logged")
    line = wait_for(lambda: next((m for m in publisher.logs
                                  if "path=/logged " in m["line"]), None),
                    what="access log line")
    assert line["app"] == "beta" and line["proc"] == "router"
    assert "status=200" in line["line"] and "backend=127.0.0.2:" in line["line"]
    assert "request_id=" in line["line"] and "client=127.0.0.1" in line["line"]
    assert line.sender == "bal-test"


def test_route_changes_reach_a_running_balancer(balancer, publisher, backends):
    publisher.set("beta", {"hosts": ["beta.localhost", "new.localhost"],
                           "backends": [backends["beta"].entry], "reason": ""})
    wait_routed(balancer.port, "new.localhost")
    publisher.set("beta", {"hosts": ["beta.localhost"],
                           "backends": [backends["beta"].entry], "reason": ""})
    wait_routed(balancer.port, "new.localhost", expect=404)


def test_killing_one_of_two_backends_fails_no_get(tmp, balancer, publisher):
    one, two = Backend(tmp, "gamma"), Backend(tmp, "gamma")
    failures: list = []
    statuses: list[int] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def load() -> None:
        c: Client | None = None
        while not stop.is_set():
            try:
                if c is None:
                    c = Client(balancer.port)
                c.send(b"GET /sleep?0.01 HTTP/1.1\r\nHost: gamma.localhost\r\n\r\n")
                statuses.append(c.response()[0])
            except Exception as exc:     # any: a thread that dies unheard hides the cause
                failures.append(exc)
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.05)        # no busy loop of refused connections
        if c is not None:
            c.close()

    def state() -> str:
        """What the load saw, what each backend got, and the balancer's log: said
        whenever a wait below runs out (it once did with nothing said)."""
        return (f"answers {collections.Counter(statuses)}; failures "
                f"{[repr(f) for f in failures[:5]]}; requests at one "
                f"{len(one.requests())}, at two {len(two.requests())}; balancer log:\n"
                + balancer.stderr.read_text(errors="replace")[-4000:])

    try:
        publisher.set("gamma", {"hosts": ["gamma.localhost"],
                                "backends": [one.entry, two.entry], "reason": ""})
        wait_routed(balancer.port, "gamma.localhost")
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        # the load reaches both backends before one of them dies...
        try:
            wait_for(lambda: ("GET /sleep" in one.requests()
                              and "GET /sleep" in two.requests()) or failures,
                     timeout=30.0, what="load on both backends")  # busy machine
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {state()}") from None
        # before the kill nothing may fail: say what did (it was once refused
        # connections at the balancer's port, with no more said)
        assert not failures, state()
        one.kill()
        # ...and keeps going until the balancer has found it dead twice: marked down,
        # tried again when that backoff (0.5 s) ran out, and marked down for 1 s
        dead = re.compile(rf"marked down.* backend={BACKEND_HOST}:{one.port} .*"
                          r"backoff=([0-9.]+)")

        def longest_backoff() -> float:
            text = balancer.stderr.read_text(errors="replace")
            return max((float(m.group(1)) for m in dead.finditer(text)), default=0.0)
        wait_for(lambda: longest_backoff() >= 1 or failures, what="a second mark-down")
        served = len(statuses)
        wait_for(lambda: len(statuses) >= served + 20 or failures,
                 what="20 more answers after that")
        stop.set()
        for t in threads:
            t.join(10)
        assert not failures, state()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
    finally:
        stop.set()              # the load threads never outlive the test
        for t in threads:
            t.join(15)
        one.stop()
        two.stop()
        publisher.set("gamma", None)


class FlakyBackend(threading.Thread):
    """A raw HTTP/1.1 server that answers the first request on each connection
    (keep-alive) and closes the connection on the second without a byte: what a
    backend timing out an idle keep-alive connection looks like to a proxy."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server((BACKEND_HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.seen: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock, self.connections),
                             daemon=True).start()
        self.listener.close()

    def _serve(self, sock: socket.socket, number: int) -> None:
        with sock:
            sock.settimeout(10)
            buf = b""
            for count in (1, 2):
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.seen.append(f"{head.split()[0].decode()} conn={number}")
                if count == 2:
                    return          # close without answering
                body = b"conn=%d" % number
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))


def test_reused_connection_closed_by_backend_is_retried_when_idempotent(balancer,
                                                                        publisher):
    flaky = FlakyBackend()
    flaky.start()
    try:
        publisher.set("flaky", {"hosts": ["flaky.localhost"], "reason": "",
                                "backends": [{"id": "f", "address": BACKEND_HOST,
                                              "port": flaky.port}]})
        wait_for(lambda: get(balancer.port, "flaky.localhost")[0] != 404,
                 what="flaky route")
        # the probe above left conn N pooled; a GET now is sent on it, the backend
        # closes without answering, and the balancer resends on a fresh connection
        before = flaky.connections
        status, _, body = get(balancer.port, "flaky.localhost", "/again")
        assert status == 200 and body == b"conn=%d" % (before + 1)
        # a POST is not idempotent: the same situation is a 502, sent once
        status, _, _ = get(balancer.port, "flaky.localhost", "/pooled")
        assert status == 200
        c = Client(balancer.port)
        try:
            c.send(b"POST /once HTTP/1.1\r\nHost: flaky.localhost\r\n"
                   b"Content-Length: 0\r\n\r\n")
            assert c.response()[0] == 502
        finally:
            c.close()
        assert sum(1 for s in flaky.seen if s.startswith("POST")) == 1
    finally:
        flaky.halt.set()
        flaky.join(5)
        publisher.set("flaky", None)


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp, publisher, backends,
                                                            engine):
    bal = BalancerProc(tmp, publisher, **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        alpha = backends["alpha"]
        before = len(alpha.requests())
        c = Client(bal.port)
        c.send(b"GET /sleep?1 HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
        wait_for(lambda: alpha.requests()[before:] == ["GET /sleep"],
                 what="the request in flight at the backend")
        bal.proc.send_signal(signal.SIGTERM)
        status, headers, _ = c.response()
        assert status == 200 and headers["connection"] == "close"
        c.close()
        assert bal.proc.wait(10) == 0
    finally:
        bal.stop()


def test_settings_errors_name_the_setting(tmp):
    path = tmp / "bad.yaml"
    path.write_text("balancer:\n  listen_port: lots\n")
    out = subprocess.run([PY, "-m", "balancer", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "balancer.listen_port" in out.stderr
    path.write_text("balancer:\n  listen_host: 0.0.0.0\n")
    out = subprocess.run([PY, "-m", "balancer", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "loopback" in out.stderr
    for engine in ("eventlet", "asyncio"):      # refused before any worker starts
        path.write_text(f"balancer:\n  engine: {engine}\n  trusted_proxies: [nonsense]\n")
        out = subprocess.run([PY, "-m", "balancer", "--config", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "balancer.trusted_proxies" in out.stderr
        assert "Traceback" not in out.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


class CutOffBackend:
    """A backend that answers with a head and part of its body, then dies (as a
    gunicorn worker killed between its two writes would)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.entry = {"id": "cutoff", "address": "127.0.0.2", "port": self.port}
        self.served = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.settimeout(5)
                try:
                    client.recv(65536)
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                except OSError:
                    pass
                self.served += 1

    def close(self) -> None:
        self.sock.close()


def answered_200(port: int, host: str) -> bool:
    try:
        return get(port, host)[0] == 200
    except OSError:                 # ConnectionError included
        return False


def test_backend_dying_mid_response_is_retried_for_get(tmp, balancer, publisher):
    good, bad = Backend(tmp, "delta"), CutOffBackend()
    try:
        publisher.set("delta", {"hosts": ["delta.localhost"],
                                "backends": [bad.entry, good.entry], "reason": ""})
        wait_routed(balancer.port, "delta.localhost")
        for _ in range(10):
            status, _, body = get(balancer.port, "delta.localhost", "/")
            assert status == 200 and b"partial" not in body
        assert bad.served >= 1          # the cut-off one was tried, then retried away
        publisher.set("delta", {"hosts": ["delta.localhost"], "backends": [bad.entry],
                                "reason": ""})
        # the balancer has the new route once a GET, with no good instance left to
        # retry on, stops being answered 200
        wait_for(lambda: not answered_200(balancer.port, "delta.localhost"),
                 what="route to the cut-off backend only")
        c = Client(balancer.port)       # a POST is never resent: its client sees the cut
        try:
            c.send(b"POST / HTTP/1.1\r\nHost: delta.localhost\r\nContent-Length: 0\r\n\r\n")
            with pytest.raises((ConnectionError, OSError)):
                c.response()
        finally:
            c.close()
    finally:
        good.stop()
        bad.close()
        publisher.set("delta", None)


# -- static files: the platform's static file server, not the app -----------------------

@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
    """The runner's static file server (runner/staticsup.py) on BACKEND_HOST, holding
    release 3 of the app `shop` (a stand-in app user's files)."""
    if os.geteuid() != 0:
        pytest.skip("the static file server drops from root to nobody")
    from runner.staticsup import StaticSupervisor
    apps = tmp_path_factory.mktemp("static-apps")
    root = apps / "shop" / "releases" / ("f" * 64) / ".berth" / "static"
    (root / "css").mkdir(parents=True)
    (root / "css" / "site.0123456789ab.css").write_text("body{color:teal}\n")
    for path in [apps / "shop", *(apps / "shop").rglob("*")]:
        os.chown(path, 54321, 54321)
        path.chmod(0o755 if path.is_dir() else 0o644)
    sup = StaticSupervisor(BACKEND_HOST, 0, apps, (65534, 65534))
    sup.start(time.monotonic())
    sup.want({("shop", 3): (root, "/static/")})
    wait_for(lambda: sup.step(time.monotonic()) or (sup.up_port and not sup.outbox),
             what="static server up")
    yield sup
    sup.close()


def shop_route(backends, static_port: int) -> dict:
    return {"hosts": ["shop.localhost"], "backends": [backends["alpha"].entry],
            "reason": "", "static": {
                "prefix": "/static/", "releases": [3],
                "backends": [{"id": "static@r1", "address": BACKEND_HOST,
                              "port": static_port}]}}


def test_static_files_come_from_the_static_server_not_the_app(balancer, publisher,
                                                               backends, static_server):
    publisher.set("shop", shop_route(backends, static_server.port))
    wait_routed(balancer.port, "shop.localhost")
    path = "/static/css/site.0123456789ab.css"
    # a client's own X-Berth-Static never reaches anyone
    status, headers, body = get(balancer.port, "shop.localhost", path,
                                "X-Berth-Static: shop /static/ 99\r\n")
    assert (status, body) == (200, b"body{color:teal}\n")
    assert headers["server"] == "berth-static"
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["content-type"] == "text/css; charset=utf-8"
    status, again, body = get(balancer.port, "shop.localhost", path,
                              f"If-None-Match: {headers['etag']}\r\n")
    assert (status, body) == (304, b"") and again["etag"] == headers["etag"]
    assert get(balancer.port, "shop.localhost", "/static/css/none.css")[0] == 404
    assert not [r for r in backends["alpha"].requests() if r.startswith(f"GET {path}")]
    # pages, and what is not a GET or HEAD, still go to the app; it never sees the header
    _, _, page = get(balancer.port, "shop.localhost", "/page",
                     "X-Berth-Static: shop /static/ 3\r\n")
    assert b"app=alpha" in page and b"HTTP_X_BERTH_STATIC=-" in page
    c = Client(balancer.port)
    try:
        c.send(f"POST {path} HTTP/1.1\r\nHost: shop.localhost\r\nContent-Length: 2\r\n"
               "Connection: close\r\n\r\nhi".encode())
        assert b"app=alpha" in c.response()[2]
    finally:
        c.close()
    assert f"POST {path}" in backends["alpha"].requests()


def test_static_requests_fall_back_to_the_app_when_no_static_server_answers(
        balancer, publisher, backends):
    publisher.set("shop", shop_route(backends, free_port(BACKEND_HOST)))   # nothing there
    wait_for(lambda: b"app=alpha" in get(balancer.port, "shop.localhost",
                                         "/static/probe.css")[2], what="the new route")
    for n in range(3):      # the static server is down-marked: straight to the app
        started = time.monotonic()
        status, headers, body = get(balancer.port, "shop.localhost", f"/static/fb{n}.css")
        assert status == 200 and b"app=alpha" in body
        assert headers.get("server") != "berth-static"
        assert time.monotonic() - started < 1
    assert "GET /static/fb2.css" in backends["alpha"].requests()
