"""The controller's API server under abuse, as a real process: hundreds of slow and
half-open connections leave it answering others at once and are closed by their
deadlines; every malformed request is a 4xx saying what was wrong; every endpoint
answers malformed input without a 5xx."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.api import ROUTES
from tests.integration.controllerproc import ControllerProc, running_controller

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
IDLE_TIMEOUT = 2.0
SLOW = 500                  # slow or half-open connections
ANSWER_WITHIN = 0.100


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProc]:
    with running_controller(tmp_path_factory.mktemp("api"),
                            api_header_timeout=HEADER_TIMEOUT, api_body_timeout=BODY_TIMEOUT,
                            api_idle_timeout=IDLE_TIMEOUT, api_streams=4) as c:
        yield c


def connect(ctl: ControllerProc, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", ctl.ports.api), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def raw(ctl: ControllerProc, data: bytes, timeout: float = 10.0) -> tuple[int, Any]:
    with connect(ctl, timeout) as sock:
        sock.sendall(data)
        status, _, body = read_response(sock)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def get(ctl: ControllerProc, target: str, token: bool = True) -> bytes:
    auth = f"Authorization: Bearer {ctl.admin_token}\r\n" if token else ""
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()


def post(ctl: ControllerProc, target: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ctl.admin_token}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}"
            f"\r\n").encode() + body


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def test_slow_and_half_open_connections_leave_the_api_answering(ctl: ControllerProc) -> None:
    assert ctl.proc is not None
    threads_before = threads_of(ctl.proc.pid)
    slow: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(SLOW):
            sock = connect(ctl)
            if i % 2:           # slowloris: a head that never ends, a byte at a time
                sock.sendall(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)

        def drip() -> None:
            while not stop.wait(0.5):
                for sock in slow[1::2]:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        time.sleep(0.5)
        timings = []
        for _ in range(20):
            started = time.monotonic()
            status, body = raw(ctl, get(ctl, "/v1/apps"))
            timings.append(time.monotonic() - started)
            assert status == 200, body
        threads_during = threads_of(ctl.proc.pid)
        worst = max(timings)
        print(f"\n{SLOW} slow/half-open connections held: 20 GET /v1/apps answered in "
              f"{sorted(timings)[10] * 1000:.1f} ms median, {worst * 1000:.1f} ms worst; "
              f"controller threads {threads_before} before, {threads_during} during")
        assert worst < ANSWER_WITHIN, timings
        assert threads_during <= threads_before + 16 + 2, (threads_before, threads_during)

        # each is closed by its deadline: a 408 for the slowloris, nothing to say to the
        # silent ones (a 408 too); none stays open past it
        deadline = time.monotonic() + HEADER_TIMEOUT + 3.0
        closed = 0
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                closed += 1
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except TimeoutError:
                pass
        print(f"closed by the server within {HEADER_TIMEOUT + 3.0:.0f}s: {closed}/{SLOW}")
        assert closed == SLOW
    finally:
        stop.set()
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("request_bytes,status,needle", [
    (b"POST /v1/apps HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400,
     "Content-Length 'abc' is not a number"),
    (b"POST /v1/apps HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400,
     "Content-Length '-5'"),
    (b"POST /v1/apps HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "two different Content-Length"),
    (b"POST /v1/apps HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
     "Content-Length"),
    (b"HELLO\r\n\r\n", 400, "malformed request line"),
    (b"GET /v1/apps HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header line"),
    (b"GET /v1/apps HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, "request head is over"),
    (b"GET /v1/apps HTTP/9.9\r\n\r\n", 400, "HTTP version 'HTTP/9.9'"),
    (b"POST /v1/apps HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413, "over the API's"),
    (b"OPTIONS /v1/apps HTTP/1.1\r\n\r\n", 405, "method 'OPTIONS' is not allowed"),
    (b"GET /v1/apps HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431, "Too many headers"),
])
def test_malformed_heads_are_4xx_saying_what_was_wrong(ctl, request_bytes, status, needle):
    got, body = raw(ctl, request_bytes)
    assert got == status, body
    assert needle in body["error"]["message"] + body["error"]["hint"], body
    assert body["error"]["hint"]


@pytest.mark.parametrize("target,needle", [
    ("/v1/apps/nope/logs?lines=abc", "lines='abc' is not a whole number"),
    ("/v1/apps/nope/logs?lines=-1", "lines=-1 is below 0"),
    ("/v1/builds/abc/log?offset=x", "offset='x'"),
    ("/v1/stats?follow=1&count=many", "count='many'"),
])
def test_malformed_numbers_in_queries_are_400(ctl, target, needle):
    if "/apps/nope/" in target:
        raw(ctl, post(ctl, "/v1/apps", b'{"name": "nope"}'))
    status, body = raw(ctl, get(ctl, target))
    assert status == 400 and needle in body["error"]["message"], body


def test_a_body_that_never_comes_is_408_after_its_deadline(ctl):
    with connect(ctl, BODY_TIMEOUT + 5) as sock:
        started = time.monotonic()
        sock.sendall(post(ctl, "/v1/apps", b'{"name": "x"}')[:-5])     # 5 bytes short
        status, _, body = read_response(sock)
        took = time.monotonic() - started
    assert status == 408 and b"body did not arrive" in body
    assert BODY_TIMEOUT - 0.2 <= took <= BODY_TIMEOUT + 1.0


def test_keep_alive_serves_several_requests_and_idle_ones_are_closed(ctl):
    with connect(ctl) as sock:
        for _ in range(3):
            sock.sendall(get(ctl, "/v1/health", token=False))
            assert read_response(sock)[0] == 200
        sock.sendall(get(ctl, "/v1/health", token=False) * 2)           # pipelined
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 2:       # both answers, in order
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        sock.settimeout(IDLE_TIMEOUT + 3)
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started <= IDLE_TIMEOUT + 1.0


def test_streams_beyond_the_limit_are_503_and_others_keep_answering(ctl):
    follows = []
    try:
        for _ in range(4):                  # api_streams=4 in this platform
            sock = connect(ctl)
            sock.sendall(get(ctl, "/v1/stats?follow=1"))
            assert read_response(sock)[0] == 200
            follows.append(sock)
        status, body = raw(ctl, get(ctl, "/v1/stats?follow=1"))
        assert status == 503 and "streams already" in body["error"]["message"]
        assert raw(ctl, get(ctl, "/v1/apps"))[0] == 200
    finally:
        for sock in follows:
            sock.close()
    # a follower that hung up frees its stream within a couple of seconds
    deadline = time.monotonic() + 10
    while raw(ctl, get(ctl, "/v1/stats?follow=1&count=1"))[0] == 503:
        assert time.monotonic() < deadline, "streams were not freed"
        time.sleep(0.2)


def _fill(pattern: str) -> str:
    path = re.sub(r"\([^)]*\)", "zz", pattern)
    return path.replace("\\", "")


BODIES = [b"", b"[]", b'"text"', b"{bad json", b'{"name": 5, "version": "x", "web": "x"}',
          b"null", b'{"command": 1, "cols": "x", "tty": "yes"}', b"{}"]


def test_every_endpoint_answers_malformed_input_without_a_5xx(ctl):
    raw(ctl, post(ctl, "/v1/apps", b'{"name": "zz"}'))
    failures = []
    for method, pattern, name in ROUTES:
        path = _fill(pattern.pattern.strip("^$"))
        for body in BODIES if method in ("POST", "PATCH", "PUT") else [b""]:
            for query in ("", "?lines=x&offset=y&count=z&all=2"):
                req = (f"{method} {path}{query} HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {ctl.admin_token}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                status, answer = raw(ctl, req)
                no_jobs = isinstance(answer, dict) and answer.get("error", {}).get(
                    "code") == "no_jobs"
                if status >= 500 and not no_jobs:
                    failures.append(f"{method} {path}{query} {body!r}: {status} {answer}")
                elif status >= 400:
                    assert answer["error"]["message"], answer
    assert not failures, "\n".join(failures)


def test_a_push_trickling_in_below_the_minimum_rate_is_408(ctl):
    raw(ctl, post(ctl, "/v1/apps", b'{"name": "trickle"}'))
    head = (f"POST /v1/apps/trickle/builds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{ctl.admin_token}\r\nContent-Length: 100000\r\n\r\n").encode()
    with connect(ctl, 15) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 10:
            try:
                sock.send(b"x" * 10)                # 20 bytes/s, far below 4 kB/s
            except OSError:
                pass
            time.sleep(0.5)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"bytes/s, below the API's 4096 bytes/s" in answer
    assert BODY_TIMEOUT <= took <= BODY_TIMEOUT + 2.0, took
    uploads = ctl.data_dir / "controller" / "uploads"
    assert not list(uploads.glob("*.upload"))           # nothing half-written left


def test_at_the_connection_limit_the_longest_waiting_are_shed(tmp_path):
    with running_controller(tmp_path / "few", api_max_connections=50) as few:
        silent = [connect(few) for _ in range(60)]
        try:
            time.sleep(0.5)
            assert raw(few, get(few, "/v1/apps"))[0] == 200
            shed = 0
            for sock in silent[:12]:
                sock.settimeout(2.0)
                try:
                    shed += sock.recv(10) == b""
                except (TimeoutError, ConnectionResetError):
                    pass
            assert shed >= 10, shed            # the oldest made room for the newest
            silent[-1].sendall(get(few, "/v1/health", token=False))
            assert read_response(silent[-1])[0] == 200
        finally:
            for sock in silent:
                sock.close()
