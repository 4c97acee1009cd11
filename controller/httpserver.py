"""A bounded HTTP/1.1 server for the controller's API, around `http.server` handlers.

Why not ThreadingHTTPServer: it gives every connection a thread that blocks reading
the request head, with no deadline, so 190 half-open connections held 195 threads.
Why not a packaged server (waitress, cheroot, gunicorn, uvicorn): the API streams
build and log output for as long as a client follows, and `berth run` takes over its
connection after `101 Switching Protocols` (controller/attach.py); WSGI servers
offer no such hand-over, and an ASGI rewrite of every endpoint would buy the same
bounds this module gives the existing handler.

How it is bounded:
- One selector thread accepts and reads every request head (and a small body) into a
  buffer, so a connection costs a file descriptor and a buffer until its request is
  whole, never a thread. A head must arrive within `header_timeout` of the
  connection (or of its first byte after a keep-alive pause), a buffered body within
  `body_timeout` after it; otherwise 408. Heads over `max_header` bytes: 431.
- A whole request goes to a pool of `workers` threads; at most `queue` may wait for
  one (503 beyond). Requests that last (follows, uploads, `berth run`'s attach;
  `is_long(method, target)` says which) get a thread of their own,
  at most `streams` of them at once (503 beyond).
- At most `max_connections` connections; at the limit the one that waited longest
  without a whole request is closed to make room. Buffers of all waiting
  connections together stay under `max_buffered` bytes (503 beyond).
- On a dispatched connection every read and write times out after `io_timeout`,
  and a body the handler reads itself (a push) must average `min_body_rate` bytes/s
  once `body_timeout` has passed (BodyTooSlow, answered 408).
- Keep-alive: after a response the connection goes back to the selector (idle for at
  most `idle_timeout`), so an idle client never holds a worker.
- A malformed head (request line, header line, Content-Length, Transfer-Encoding)
  is answered 400/411/413 by the selector thread with what was wrong.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger(__name__)

SWEEP_EVERY = 0.1


@dataclass(frozen=True)
class ServerLimits:
    workers: int = 16
    streams: int = 64
    queue: int = 256
    max_connections: int = 2000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    io_timeout: float = 60.0
    max_header: int = 64 * 1024
    max_body_buffered: int = 1 << 20        # larger bodies only for `is_long` requests
    min_body_rate: int = 4096               # bytes/s a handler's reads must average
    max_buffered: int = 64 << 20


class Refused(Exception):
    """A request the selector answers itself: status, message, hint."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint


def error_response(status: int, code: str, message: str, hint: str = "",
                   reason: str = "") -> bytes:
    """A whole `Connection: close` response with the API's error body."""
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    return (f"HTTP/1.1 {status} {reason or code}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Head:
    method: str
    target: str
    content_length: int
    size: int               # bytes of the head, blank line included


def parse_head(buf: bytes, max_header: int) -> Head | None:
    """The head of the request at the start of `buf`, or None while incomplete.
    Refused when it is malformed or too large."""
    start = 0
    while buf.startswith(b"\r\n", start):    # stray CRLFs before a request
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buf) - start > max_header:
            raise Refused(431, "header_too_large",
                          f"the request head is over {max_header // 1024} kB",
                          "send fewer or shorter headers")
        return None
    if end - start > max_header:
        raise Refused(431, "header_too_large",
                      f"the request head is over {max_header // 1024} kB",
                      "send fewer or shorter headers")
    lines = bytes(buf[start:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise Refused(400, "bad_request", f"malformed request line {lines[0][:80]!r}",
                      "send `METHOD /path HTTP/1.1`")
    if parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise Refused(400, "bad_request", f"HTTP version {parts[2][:20]!r} is not spoken "
                      "here", "send HTTP/1.1")
    lengths, chunked = set(), False
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refused(400, "bad_request", f"malformed header line {line[:80]!r}",
                          "send `Name: value` header lines")
        lname, value = name.lower(), value.strip()
        if lname == "content-length":
            if not value.isdigit() or len(value) > 18:
                raise Refused(400, "bad_content_length",
                              f"Content-Length {value[:40]!r} is not a number of bytes",
                              "send the body's size in bytes as a decimal number")
            lengths.add(int(value))
        elif lname == "transfer-encoding":
            chunked = True
    if len(lengths) > 1:
        raise Refused(400, "bad_content_length", "the request has two different "
                      "Content-Length headers", "send one")
    if chunked:
        raise Refused(411, "length_required", "request bodies must come with a "
                      "Content-Length; Transfer-Encoding is not accepted",
                      "send the body with its Content-Length")
    return Head(parts[0], parts[1], lengths.pop() if lengths else 0, end + 4)


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    addr: Any
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    head: Head | None = None
    idle: bool = False          # between requests: no byte of the next one yet
    registered: bool = False    # with the selector (and counted in its buffers)


class BodyTooSlow(TimeoutError):
    """A request body arriving slower than the server's minimum rate."""


class _Prefixed(io.RawIOBase):
    """A connection's bytes: what the selector buffered first, then the socket, at
    `min_rate` bytes/s on average once `grace` seconds have passed. Once `stop` is
    set it reads nothing more (what the reader buffered is kept)."""

    def __init__(self, sock: socket.socket, prefix: bytes, grace: float = 30.0,
                 min_rate: int = 0) -> None:
        self.sock = sock
        self.prefix = memoryview(prefix)
        self.stop = False
        self.grace, self.min_rate = grace, min_rate
        self.started: float | None = None
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int | None:
        if len(self.prefix):
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        if self.stop:
            return None
        now = time.monotonic()
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        if self.min_rate and elapsed > self.grace and self.count < elapsed * self.min_rate:
            raise BodyTooSlow(f"the request body came at {self.count / elapsed:.0f} bytes/s, "
                              f"below the API's {self.min_rate} bytes/s")
        n = self.sock.recv_into(b)
        self.count += n
        return n

    def close(self) -> None:        # the socket belongs to the server
        super().close()


class _SocketWriter(io.BufferedIOBase):
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        return memoryview(b).nbytes


class BoundedHandler(BaseHTTPRequestHandler):
    """One request per dispatch on a connection the server owns; what the reader
    buffered past it is handed back (`leftover`) for the next request."""

    protocol_version = "HTTP/1.1"
    leftover = b""

    def setup(self) -> None:
        sock, prefix = self.request
        self.connection = sock
        limits: ServerLimits = getattr(self.server, "limits", ServerLimits())
        self._raw = _Prefixed(sock, prefix, limits.body_timeout, limits.min_body_rate)
        self.rfile = io.BufferedReader(self._raw, 1 << 16)
        self.wfile = _SocketWriter(sock)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        if not self.close_connection:
            self._raw.stop = True
            self.leftover = self.rfile.read1(1 << 20) or b""


class BoundedHTTPServer:
    def __init__(self, address: tuple[str, int], handler: type[BoundedHandler],
                 limits: ServerLimits,
                 is_long: Callable[[str, str], bool] = lambda method, target: False) -> None:
        self.handler = handler
        self.limits = limits
        self.is_long = is_long
        self.listener = socket.create_server(address, backlog=1024, reuse_port=False)
        self.listener.setblocking(False)
        self.server_address = self.listener.getsockname()
        self.stopping = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._waiting: collections.OrderedDict[int, Conn] = collections.OrderedDict()
        self._buffered = 0
        self._back: queue.SimpleQueue[Conn] = queue.SimpleQueue()   # from workers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="api")
        self._queued = 0
        self._busy = threading.Lock()
        self._streams = threading.BoundedSemaphore(limits.streams)
        self._thread = threading.Thread(target=self._loop, name="api-selector", daemon=True)

    # -- life -------------------------------------------------------------------------
    def start(self) -> None:
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._wake()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def counts(self) -> dict[str, int]:
        """For tests and logs: connections waiting for a whole request, requests
        queued for a worker."""
        return {"waiting": len(self._waiting), "queued": self._queued}

    # -- the selector thread -------------------------------------------------------------
    def _loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY
        try:
            while not self.stopping.is_set():
                for key, _ in self._sel.select(SWEEP_EVERY):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._take_back()
                    else:
                        self._read(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_EVERY
        finally:
            for conn in list(self._waiting.values()):
                self._close(conn)
            self._sel.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # out of file descriptors: shed the oldest
                log.warning("api accept failed", extra={"error": str(exc)})
                self._shed()
                return
            if len(self._waiting) >= self.limits.max_connections:
                self._shed()
            sock.setblocking(False)
            conn = Conn(sock, addr, time.monotonic() + self.limits.header_timeout)
            self._wait(conn)

    def _shed(self) -> None:
        if self._waiting:
            oldest = next(iter(self._waiting.values()))
            log.info("api connection shed", extra={"peer": oldest.addr,
                                                    "waiting": len(self._waiting)})
            self._close(oldest)

    def _wait(self, conn: Conn) -> None:
        self._waiting[conn.sock.fileno()] = conn
        self._buffered += len(conn.buf)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        conn.registered = True

    def _forget(self, conn: Conn) -> None:
        """Out of the selector's hands (dispatched or closing)."""
        if not conn.registered:
            return
        conn.registered = False
        self._waiting.pop(conn.sock.fileno(), None)
        self._buffered -= len(conn.buf)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _take_back(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                conn = self._back.get_nowait()
            except queue.Empty:
                return
            if self.stopping.is_set():
                self._close(conn)
                continue
            conn.sock.setblocking(False)
            conn.idle, conn.head = not conn.buf, None
            conn.deadline = time.monotonic() + (self.limits.idle_timeout if conn.idle
                                                else self.limits.header_timeout)
            self._wait(conn)
            if conn.buf:
                self._progress(conn)            # a pipelined request, whole already?

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.idle:
            conn.idle = False
            conn.deadline = time.monotonic() + self.limits.header_timeout
        conn.buf += data
        self._buffered += len(data)
        if self._buffered > self.limits.max_buffered:
            self._refuse(conn, Refused(503, "busy", "the API has too many requests in "
                                       "flight to read this one", "try again shortly"))
            return
        self._progress(conn)

    def _progress(self, conn: Conn) -> None:
        """Dispatch the connection once its request is whole enough."""
        try:
            if conn.head is None:
                conn.head = parse_head(bytes(conn.buf), self.limits.max_header)
                if conn.head is None:
                    return
                conn.deadline = time.monotonic() + self.limits.body_timeout
            head = conn.head
            long = self.is_long(head.method, head.target)
            if not long and head.content_length > self.limits.max_body_buffered:
                raise Refused(413, "too_large", f"the request body of {head.content_length} "
                              f"bytes is over the API's {self.limits.max_body_buffered} "
                              "bytes", "send less")
            if not long and len(conn.buf) < head.size + head.content_length:
                return                          # the rest of a small body first
        except Refused as exc:
            self._refuse(conn, exc)
            return
        self._forget(conn)
        self._dispatch(conn, long)

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self._waiting.values() if c.deadline <= now]:
            if conn.idle:
                self._close(conn)
            elif conn.head is None:
                self._refuse(conn, Refused(
                    408, "timeout", "the request head did not arrive within "
                    f"{self.limits.header_timeout:g}s", "send the whole head at once"))
            else:
                self._refuse(conn, Refused(
                    408, "timeout", f"the request body did not arrive within "
                    f"{self.limits.body_timeout:g}s", "send the body right after the head"))

    def _refuse(self, conn: Conn, exc: Refused) -> None:
        self._forget(conn)
        log.info("api request refused", extra={"peer": conn.addr, "status": exc.status,
                                               "error": exc.message})
        try:
            conn.sock.send(error_response(exc.status, exc.code, exc.message, exc.hint))
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        self._forget(conn)
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- dispatch -------------------------------------------------------------------------
    def _dispatch(self, conn: Conn, long: bool) -> None:
        if long:
            if not self._streams.acquire(blocking=False):
                self._refuse(conn, Refused(503, "busy", f"the API serves "
                                           f"{self.limits.streams} streams already",
                                           "try again when one has ended"))
                return
            threading.Thread(target=self._serve, args=(conn, True), name="api-stream",
                             daemon=True).start()
            return
        with self._busy:
            if self._queued >= self.limits.queue:
                full = True
            else:
                full = False
                self._queued += 1
        if full:
            self._refuse(conn, Refused(503, "busy", "the API has too many requests "
                                       "waiting", "try again shortly"))
            return
        self._pool.submit(self._serve, conn, False)

    def _serve(self, conn: Conn, long: bool) -> None:
        if not long:
            with self._busy:
                self._queued -= 1
        keep = False
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(self.limits.io_timeout)
            prefix, conn.buf = bytes(conn.buf), bytearray()
            handler = self.handler((conn.sock, prefix), conn.addr, self)  # type: ignore[arg-type]
            keep = not handler.close_connection and not self.stopping.is_set()
            if keep:
                conn.buf = bytearray(handler.leftover)
        except Exception as exc:            # a client gone mid-request, a timeout
            log.debug("api connection ended", extra={"peer": conn.addr, "error": str(exc)})
        finally:
            if long:
                self._streams.release()
        if keep:
            self._back.put(conn)
            self._wake()
        else:
            try:
                conn.sock.close()
            except OSError:
                pass
