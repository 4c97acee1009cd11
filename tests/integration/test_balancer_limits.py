"""Issue 3's acceptance against real processes: WebSocket tunnelling, 1xx relaying,
per-app limits (maintenance, max_body), trusted proxies, stats on the stats channel,
10,000 idle keep-alive connections and slowloris, reload (SIGHUP) without dropped
requests. Each test runs once per engine (test_balancer.ENGINES, through its shared
`engine` fixture). Every process started here is stopped here by its PID; loopback
only."""
from __future__ import annotations

import base64
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq

from messaging import channels
from messaging.envelope import decode
from tests.integration import wsecho
from tests.integration.test_balancer import (  # noqa: F401  (fixtures)
    BACKEND_HOST, ENGINES, PY, Backend, BalancerProc, Client, Publisher, _bounded, engine,
    free_port, get, wait_for, wait_port, wait_routed,
)

WSECHO = str(Path(wsecho.__file__))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("balancer-limits")


@pytest.fixture(scope="module")
def publisher():
    pub = Publisher()
    yield pub
    pub.close()


class StatsSink:
    """The controller's stats XSUB, played by a plain SUB bound on the endpoint the
    balancer's PUB connects to; collects every message in a thread."""

    def __init__(self) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.messages: list = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"stats")
        sub.bind(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sub.poll(50):
                    self.messages.append(decode(sub.recv_multipart()))
        finally:
            sub.close(linger=0)
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def sink():
    s = StatsSink()
    yield s
    s.close()


class EchoServer:
    def __init__(self) -> None:
        self.port = free_port(BACKEND_HOST)
        self.proc = subprocess.Popen([PY, WSECHO, BACKEND_HOST, str(self.port)])
        wait_port(BACKEND_HOST, self.port, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def backends(tmp, publisher):
    alpha = Backend(tmp, "alpha")
    echo = EchoServer()
    publisher.set("alpha", {"hosts": ["alpha.localhost"], "backends": [alpha.entry],
                            "reason": ""})
    publisher.set("ws", {"hosts": ["ws.localhost"], "reason": "",
                         "backends": [{"id": "ws", "address": BACKEND_HOST,
                                       "port": echo.port}]})
    yield {"alpha": alpha, "echo": echo}
    alpha.stop()
    echo.stop()


@pytest.fixture(scope="module")
def balancer(tmp, publisher, backends, sink, engine):
    bal = BalancerProc(tmp, publisher, header_timeout=2.0, response_timeout=5.0,
                       idle_timeout=120.0, ws_idle_timeout=1.5,
                       stats_endpoint=sink.endpoint, stats_interval=0.5,
                       trusted_proxies=["127.0.0.3/32"], maintenance_retry_after=42,
                       log_level="info", **engine)
    wait_routed(bal.port, "alpha.localhost")
    yield bal
    assert bal.stop() == 0


def worker_pids(master_pid: int) -> list[int]:
    path = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return [int(p) for p in path.read_text().split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- WebSocket ----------------------------------------------------------------------------

class WsClient:
    def __init__(self, port: int, host: str = "ws.localhost") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "closed during the handshake"
            self.buf += data
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        self.head = head.decode("latin-1")
        assert self.head.startswith("HTTP/1.1 101"), self.head
        assert f"Sec-WebSocket-Accept: {wsecho.accept_key(key)}" in self.head

    def echo(self, data: bytes, opcode: int = 2) -> bytes:
        self.sock.sendall(wsecho.frame(opcode, data, mask=os.urandom(4)))
        got_opcode, got = wsecho.read_frame(self.sock, self.buf, masked=False)
        assert got_opcode == opcode
        return got

    def close(self) -> None:
        self.sock.close()


def test_websocket_echo_5_clients_x_200(balancer, backends):
    results: dict[int, int] = {}
    errors: list = []

    def client(n: int) -> None:
        try:
            ws = WsClient(balancer.port)
            ok = 0
            for i in range(200):
                payload = os.urandom((i * 37 + n) % 300) + b"%d:%d" % (n, i)
                if ws.echo(payload, opcode=2 if i % 2 else 1) == payload:
                    ok += 1
            big = os.urandom(70000)                 # a 64-bit length frame
            assert ws.echo(big) == big
            ws.close()
            results[n] = ok
        except Exception as exc:       # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == {n: 200 for n in range(5)}


def test_websocket_idle_tunnel_is_closed(balancer, backends):
    ws = WsClient(balancer.port)
    try:
        assert ws.echo(b"hi") == b"hi"
        ws.sock.settimeout(10)
        started = time.monotonic()
        assert ws.sock.recv(1) == b""          # the balancer closed the idle tunnel
        assert time.monotonic() - started < 9
    finally:
        ws.close()


def test_declined_upgrade_is_an_ordinary_response(balancer, backends):
    c = Client(balancer.port)
    try:
        c.send(b"GET /plain HTTP/1.1\r\nHost: ws.localhost\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
        status, _, body = c.response()
        # the backend saw the Upgrade (kept for this case) and answered 200
        assert status == 200 and body == b"no upgrade path=/plain upgrade=websocket"
    finally:
        c.close()


# -- 1xx ------------------------------------------------------------------------------

class HintsBackend(threading.Thread):
    """Answers every request with 103 Early Hints, then 200; records heads."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server((BACKEND_HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            with sock:
                sock.settimeout(5)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        break
                    buf += data
                sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n"
                             b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nok")
        self.listener.close()


def test_early_hints_are_relayed_before_the_response(balancer, publisher):
    hints = HintsBackend()
    hints.start()
    try:
        publisher.set("hints", {"hosts": ["hints.localhost"], "reason": "",
                                "backends": [{"id": "h", "address": BACKEND_HOST,
                                              "port": hints.port}]})
        wait_for(lambda: get(balancer.port, "hints.localhost")[0] != 404, what="route")
        c = Client(balancer.port)
        try:
            c.send(b"GET / HTTP/1.1\r\nHost: hints.localhost\r\n\r\n")
            status, headers, _ = c.response()
            assert status == 103 and headers["link"] == "</s.css>; rel=preload"
            status, _, body = c.response()
            assert status == 200 and body == b"ok"
        finally:
            c.close()
    finally:
        hints.halt.set()
        hints.join(5)
        publisher.set("hints", None)


# -- per-app limits and forwarded headers ---------------------------------------------

def test_maintenance_is_503_with_retry_after(balancer, publisher, backends):
    alpha = backends["alpha"]
    publisher.set("shop", {"hosts": ["shop.localhost"], "backends": [alpha.entry],
                           "reason": "", "maintenance": True})
    wait_for(lambda: get(balancer.port, "shop.localhost")[0] == 503, what="maintenance")
    before = len(alpha.requests())
    status, headers, body = get(balancer.port, "shop.localhost", "/",
                                "Accept: application/json\r\n")
    assert status == 503 and headers["retry-after"] == "42"
    assert "maintenance" in json.loads(body)["message"]
    assert len(alpha.requests()) == before
    publisher.set("shop", {"hosts": ["shop.localhost"], "backends": [alpha.entry],
                           "reason": ""})
    wait_routed(balancer.port, "shop.localhost")
    publisher.set("shop", None)


def test_max_body_is_413_and_the_backend_sees_nothing(balancer, publisher, backends):
    alpha = backends["alpha"]
    publisher.set("small", {"hosts": ["small.localhost"], "backends": [alpha.entry],
                            "reason": "", "max_body": 100})
    wait_routed(balancer.port, "small.localhost")
    before = len(alpha.requests())
    # Content-Length above the limit: 413 at once, even with Expect: 100-continue
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: small.localhost\r\nContent-Length: 101\r\n"
               b"Expect: 100-continue\r\n\r\n")
        status, headers, body = c.response()
        assert status == 413 and b"100 bytes" in body and c.closed()
    finally:
        c.close()
    # chunked, over the limit in its first piece: 413, nothing sent
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: small.localhost\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"c8\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n")
        assert c.response()[0] == 413
    finally:
        c.close()
    # a later request the backend does see: the refused ones would be logged before it
    assert get(balancer.port, "small.localhost", "/after-413")[0] == 200
    wait_for(lambda: "GET /after-413" in alpha.requests()[before:], what="marker logged")
    assert alpha.requests()[before:] == ["GET /after-413"]
    # chunked, going over the limit later: the stream is cut and the client told
    before = len(alpha.requests())
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: small.localhost\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n32\r\n" + b"x" * 50 + b"\r\n")
        # the first piece was within the limit: the request is under way at the app
        wait_for(lambda: alpha.requests()[before:] == ["POST /echo"],
                 what="the streamed request at the backend")
        c.send(b"64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n")
        try:
            assert c.response()[0] == 413
        except ConnectionError:
            pass                       # or simply closed, if the app had answered
        assert c.closed()
    finally:
        c.close()
    before = len(alpha.requests())
    # within the limit, both framings pass
    c = Client(balancer.port)
    try:
        c.send(b"POST /echo HTTP/1.1\r\nHost: small.localhost\r\nContent-Length: 100\r\n"
               b"\r\n" + b"y" * 100)
        assert c.response()[2] == b"y" * 100
        c.send(b"POST /echo HTTP/1.1\r\nHost: small.localhost\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n32\r\n" + b"z" * 50 + b"\r\n0\r\n\r\n")
        assert c.response()[2] == b"z" * 50
    finally:
        c.close()
    publisher.set("small", None)


def test_forwarded_headers_only_trusted_from_trusted_proxies(balancer):
    spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n"
    _, _, body = get(balancer.port, "alpha.localhost", "/", spoof)   # from 127.0.0.1
    assert "HTTP_X_FORWARDED_FOR=127.0.0.1 " in body.decode()
    assert "HTTP_X_FORWARDED_PROTO=http " in body.decode()
    sock = socket.socket()
    sock.bind(("127.0.0.3", 0))            # the trusted proxy's address
    sock.connect(("127.0.0.1", balancer.port))
    c = Client.__new__(Client)
    c.sock, c.buf = sock, b""
    try:
        c.send(f"GET / HTTP/1.1\r\nHost: alpha.localhost\r\n{spoof}"
               "Connection: close\r\n\r\n".encode())
        text = c.response()[2].decode()
        assert "HTTP_X_FORWARDED_FOR=6.6.6.6, 127.0.0.3 " in text
        assert "HTTP_X_FORWARDED_PROTO=https " in text
    finally:
        c.close()


def test_connect_failure_is_retried_on_another_instance(balancer, publisher, backends):
    dead = {"id": "dead", "address": BACKEND_HOST, "port": free_port(BACKEND_HOST)}
    publisher.set("half", {"hosts": ["half.localhost"], "reason": "",
                           "backends": [dead, backends["alpha"].entry]})
    wait_routed(balancer.port, "half.localhost")
    statuses = [get(balancer.port, "half.localhost")[0] for _ in range(20)]
    assert statuses == [200] * 20
    publisher.set("half", None)


# -- stats ------------------------------------------------------------------------------

def test_stats_message_counts_requests_and_status_classes(balancer, publisher, backends,
                                                          sink):
    publisher.set("counted", {"hosts": ["counted.localhost"], "reason": "",
                              "backends": [backends["alpha"].entry]})
    wait_routed(balancer.port, "counted.localhost")
    seen = len(sink.messages)         # let the probe requests' interval go by
    wait_for(lambda: len(sink.messages) >= seen + 2, what="two stats intervals")
    start = len(sink.messages)
    for _ in range(7):
        assert get(balancer.port, "counted.localhost")[0] == 200
    c = Client(balancer.port)
    try:
        c.send(b"GET / HTTP/1.1\r\nHost: counted.localhost\r\nContent-Length: x\r\n\r\n")
        assert c.response()[0] == 400      # not counted for the app: no app took it
    finally:
        c.close()

    def totals() -> dict:
        total = {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0}
        for msg in sink.messages[start:]:
            figures = msg["apps"].get("counted")
            if figures:
                total["requests"] += figures["requests"]
                for k in ("2xx", "4xx", "5xx"):
                    total[k] += figures["status"][k]
        return total

    wait_for(lambda: totals()["requests"] >= 7, what="stats for counted")
    seen = len(sink.messages)               # two more intervals: nothing more arrives
    wait_for(lambda: len(sink.messages) >= seen + 2, what="two more stats intervals")
    assert totals() == {"requests": 7, "2xx": 7, "4xx": 0, "5xx": 0}
    msg = next(m for m in sink.messages[start:] if m["apps"].get("counted", {}).get(
        "requests"))
    figures = msg["apps"]["counted"]
    assert msg.type == "stats" and msg["kind"] == "balancer" and msg["host"] == "bal-test"
    assert figures["bytes_in"] > 0 and figures["bytes_out"] > 0
    assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert msg["totals"]["pid"] in worker_pids(balancer.proc.pid)
    publisher.set("counted", None)


# -- many connections -----------------------------------------------------------------

def engine_name(engine: dict) -> str:
    return next(name for name, conf in ENGINES.items() if conf == engine)


def test_10000_idle_keepalive_connections_and_slowloris(balancer, backends, engine,
                                                       sink):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 10600:
        pytest.skip(f"the hard open-files limit ({hard}) is below 10,600")
    count = 10000
    worker = worker_pids(balancer.proc.pid)[0]
    rss_before = rss_kb(worker)
    socks: list[socket.socket] = []
    request = b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n"   # a 404 we answer
    sel = selectors.DefaultSelector()
    try:
        for i in range(count):
            s = socket.socket()
            s.bind((f"127.0.1.{1 + i % 200}", 0))     # spread the source ports
            s.connect(("127.0.0.1", balancer.port))
            s.sendall(request)
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, bytearray())
        answered = 0
        deadline = time.monotonic() + 60
        while answered < count and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                data = key.fileobj.recv(65536)
                assert data, "the balancer closed a keep-alive connection"
                key.data.extend(data)
                if b"</html>" in key.data:
                    assert key.data.startswith(b"HTTP/1.1 404 ")
                    assert b"Connection: keep-alive" in key.data
                    sel.unregister(key.fileobj)
                    answered += 1
        assert answered == count
        # two stats intervals after the last answer, the worker itself still counts
        # every one of them open (it would have closed them by then)
        seen = len(sink.messages)
        wait_for(lambda: len(sink.messages) >= seen + 2, what="two more stats intervals")
        open_now = [m["totals"]["connections"] for m in sink.messages[seen:]
                    if m["totals"]["pid"] == worker]
        assert open_now and min(open_now) >= count, open_now
        still_open = 0
        for s in socks:
            try:
                s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                still_open += 1
        rss = rss_kb(worker)
        print(f"\n10k idle keep-alive ({engine_name(engine)}): {still_open} open; "
              f"balancer worker VmRSS "
              f"{rss} kB (before {rss_before} kB, {(rss - rss_before) * 1024 // count} "
              f"bytes per connection); master VmRSS {rss_kb(balancer.proc.pid)} kB")
        assert still_open == count
        assert get(balancer.port, "alpha.localhost")[0] == 200
        # and the 10k are still usable
        for s in socks[:100]:
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 404 ")
    finally:
        sel.close()
        for s in socks:
            s.close()

    # slowloris: 500 connections trickle a head byte by byte
    slow: list[socket.socket] = []
    stop = threading.Event()
    head = b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\nX-Slow: " + b"a" * 1000
    try:
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", balancer.port))
            s.setblocking(False)
            slow.append(s)

        def trickle() -> None:
            for i in range(len(head)):
                if stop.is_set():
                    return
                for s in slow:
                    try:
                        s.send(head[i:i + 1])
                    except OSError:
                        pass
                time.sleep(0.05)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        statuses = []
        for _ in range(40):
            statuses.append(get(balancer.port, "alpha.localhost")[0])
            time.sleep(0.05)
        assert statuses == [200] * 40
        # past header_timeout (2 s) each slow one gets its 408 and is closed
        deadline = time.monotonic() + 10
        refused = 0
        for s in slow:
            s.setblocking(True)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except OSError:
                continue
            refused += data.startswith(b"HTTP/1.1 408 ")
        assert refused == 500
    finally:
        stop.set()
        for s in slow:
            s.close()


# -- reload and shutdown ------------------------------------------------------------------

def test_reload_during_a_client_loop_drops_no_request(tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, processes=2, idle_timeout=1.0, log_level="info",
                       **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        first = sorted(worker_pids(bal.proc.pid))
        assert len(first) == 2
        statuses: list[int] = []
        failures: list = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    statuses.append(get(bal.port, "alpha.localhost", "/sleep?0.02")[0])
                except OSError as exc:
                    failures.append(exc)

        def answered_more(n: int) -> None:
            """Wait until the loop has had `n` more answers (or a failure)."""
            have = len(statuses)
            wait_for(lambda: len(statuses) >= have + n or failures,
                     what=f"{n} more answers")

        threads = [threading.Thread(target=loop) for _ in range(4)]
        for t in threads:
            t.start()
        answered_more(10)                   # the loop is under way...
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not set(first) & set(worker_pids(bal.proc.pid)), timeout=20,
                 what="old workers gone")
        second = sorted(worker_pids(bal.proc.pid))
        answered_more(10)                   # ...goes on after the first reload...
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not set(second) & set(worker_pids(bal.proc.pid)), timeout=20,
                 what="second generation gone")
        answered_more(10)                   # ...and after the second
        stop.set()
        for t in threads:
            t.join(10)
        assert not failures, failures[:3]
        assert len(statuses) > 20 and set(statuses) == {200}
        assert len(worker_pids(bal.proc.pid)) == 2
        # an idle keep-alive connection is closed after idle_timeout
        c = Client(bal.port)
        try:
            c.send(b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
            assert c.response()[0] == 200
            assert c.closed()
        finally:
            c.close()
    finally:
        assert bal.stop() == 0


def test_sigterm_with_workers_finishes_in_flight(tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, processes=2, **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        alpha = backends["alpha"]
        before = len(alpha.requests())
        clients = [Client(bal.port) for _ in range(4)]
        for c in clients:
            c.send(b"GET /sleep?1 HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
        wait_for(lambda: alpha.requests()[before:] == ["GET /sleep"] * 4,
                 what="all four requests in flight at the backend")
        bal.proc.send_signal(signal.SIGTERM)
        for c in clients:
            status, _, body = c.response()
            assert status == 200, body
            c.close()
        assert bal.proc.wait(15) == 0
    finally:
        bal.stop()


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_no_route_table_yet_is_503_and_a_reload_waits_for_routes(tmp, engine):
    # a controller that never answers: nothing listens on these endpoints
    nowhere = SimpleNamespace(**{name: f"tcp://127.0.0.1:{free_port()}" for name in (
        "routes_endpoint", "snapshot_endpoint", "logs_endpoint")})
    bal = BalancerProc(tmp, nowhere, startup_routes_wait=0.2, reload_timeout=1.0,
                       log_level="info", **engine)
    try:
        status, headers, body = get(bal.port, "alpha.localhost", "/",
                                    "Accept: application/json\r\n")
        assert status == 503 and "route table" in json.loads(body)["message"]
        first = worker_pids(bal.proc.pid)
        # a reload's new workers wait for routes that never come: the reload is
        # abandoned and the old workers keep serving
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload abandoned" in bal.stderr.read_text(), timeout=20,
                 what="reload abandoned")
        wait_for(lambda: worker_pids(bal.proc.pid) == first, what="new workers stopped")
        assert get(bal.port, "alpha.localhost")[0] == 503
    finally:
        assert bal.stop() == 0


def test_workers_stop_when_the_master_dies(tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, processes=2, **engine)
    workers: list[int] = []
    try:
        # every worker has started (a worker started after its master died has
        # nothing to compare its parent with)
        wait_for(lambda: "balancer master running" in bal.stderr.read_text(),
                 what="master running")
        workers = worker_pids(bal.proc.pid)
        assert len(workers) == 2
        bal.proc.kill()
        bal.proc.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=20,
                 what="orphaned workers stopped")
    finally:
        for pid in workers:            # the workers this test's master started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        bal.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
