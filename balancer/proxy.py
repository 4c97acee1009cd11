"""The eventlet I/O layer: one green thread per client connection moves bytes as
http1.py decides, picks backends through pool.py and routes through routes.py.

Per request: read and parse the head; find the app; pick a backend and get a
connection (pooled or fresh, trying another backend when a connect fails); send
the head; stream the request body in a second green thread while this one waits
for the response head (so 100-continue and early answers work); stream the
response body back; return the backend connection to the pool when it is clean.
An upgrade request answered with 101 becomes a tunnel: two green threads copy
bytes each way until one side closes or ws_idle_timeout passes with no byte.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import eventlet
from eventlet.green import socket as gsocket

from balancer import admission, http1, pages
from balancer.errors import BackendError, BadRequest
from balancer.exchange import (
    MAX_RETRIES,
    PUMP_GRACE,
    ClientGone,
    Outcome,
    PumpState,
    Retry,
)
from balancer.pool import Backend, Pool
from balancer.routes import RouteIndex
from balancer.stats import Stats

log = logging.getLogger(__name__)

BUFSIZE = 65536
FRESH_IDLE = 0.01   # seconds a pooled connection may idle and be reused unprobed
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


# Timeouts are the green sockets' own (settimeout): eventlet first tries the
# syscall and arms a hub timer only when it has to wait, so bytes that are already
# there cost no timer (an eventlet.Timeout per call scheduled and cancelled one
# every time). The timeout is read when a wait starts, so two green threads that
# share a socket (the body pump and the response reader) each get their own.

def recv(sock: Any, timeout: float) -> bytes:
    """One recv bounded by `timeout` seconds; TimeoutError past it."""
    sock.settimeout(timeout if timeout > 0.001 else 0.001)
    return sock.recv(BUFSIZE)


def send(sock: Any, data: bytes, timeout: float) -> None:
    """sendall, each wait for buffer space bounded by `timeout` seconds."""
    sock.settimeout(timeout if timeout > 0.001 else 0.001)
    sock.sendall(data)


def close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


class ClientConn:
    def __init__(self, sock: Any, addr: tuple[str, int]) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = b""
        self.busy = False
        self.accepted = time.monotonic()
        self.app: str | None = None     # the app its latest request went to (stats)
        self.head_len = 0               # size of the latest request head
        self.bytes_out = 0              # every byte written to the client
        self.requests = 0               # requests answered on this connection


class Proxy:
    def __init__(self, settings: SimpleNamespace, index: RouteIndex, pool: Pool,
                 access_log: Callable[[str, str], None] | None = None,
                 stats: Stats | None = None) -> None:
        self.s = settings
        self.index = index
        self.pool = pool
        self.access_log = access_log or (lambda app, line: None)
        self.stats = stats or Stats()
        self.trusted = http1.TrustedProxies(settings.trusted_proxies)
        self.connections: set[ClientConn] = set()
        self.draining = False

    # -- client connection --------------------------------------------------------

    def handle(self, sock: Any, addr: tuple[str, int]) -> None:
        """Serve one client connection until it closes (green thread entry)."""
        conn = ClientConn(sock, addr)
        self.connections.add(conn)
        self.stats.connection_opened()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve(conn)
        except (OSError, ClientGone, TimeoutError):
            pass
        except Exception:
            log.exception("connection failed", extra={"client": addr[0]})
        finally:
            self.connections.discard(conn)
            self.stats.connection_closed(conn.app)
            close(sock)

    def drain_idle(self) -> None:
        """On shutdown: close connections waiting for a next request. A connection
        accepted just before the listener closed has a first request on its way
        (and one whose bytes arrived unread is not waiting either): it is left to
        answer it, or to give up after header_timeout."""
        for conn in list(self.connections):
            if not conn.busy and conn.requests and not conn.buf and not _has_bytes(conn.sock):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, conn: ClientConn) -> None:
        first = True
        while True:
            try:
                req = self._read_request(conn, first)
            except BadRequest as exc:
                sent = self._send_page(conn, exc.status, exc.message, exc.hint, None, "")
                self.stats.record(None, exc.status, len(conn.buf), sent, 0.0)
                return
            if req is None:
                return
            conn.busy = True
            conn.requests += 1
            keep = self._exchange(conn, req)
            conn.busy = bool(conn.buf)
            if not keep or self.draining:
                return
            first = False

    def _read_request(self, conn: ClientConn, first: bool) -> http1.Request | None:
        """The next request head; None when the client closed or idled out."""
        if first:
            deadline = conn.accepted + self.s.header_timeout
        else:
            if not conn.buf:
                try:
                    data = recv(conn.sock, self.s.idle_timeout)
                except TimeoutError:
                    return None
                if not data:
                    return None
                conn.buf = data
            deadline = time.monotonic() + self.s.header_timeout
        while True:
            found = http1.find_head(conn.buf, self.s.max_header_bytes)
            if found:
                start, end = found
                head, conn.buf = conn.buf[start:end], conn.buf[end:]
                conn.head_len = end
                return http1.parse_request(head)
            try:
                data = recv(conn.sock, deadline - time.monotonic())
            except TimeoutError:
                if conn.buf.strip(b"\r\n"):
                    raise BadRequest("the request head did not arrive in time",
                                     f"send the whole head within "
                                     f"{self.s.header_timeout:g} seconds",
                                     status=408) from None
                return None
            if not data:
                return None
            conn.buf += data
            conn.busy = True

    def _send_page(self, conn: ClientConn, status: int, message: str, hint: str,
                   req: http1.Request | None, req_id: str, keep: bool = False) -> int:
        return self._send_raw(conn, pages.render(
            status, message, hint, accept=req.headers.get("accept") if req else None,
            request_id=req_id, keep_alive=keep, head_only=bool(req and req.method == "HEAD")))

    def _send_raw(self, conn: ClientConn, data: bytes) -> int:
        """Send an answer of our own; a client that went away is no error here."""
        try:
            send(conn.sock, data, self.s.idle_timeout)
            conn.bytes_out += len(data)
        except (OSError, TimeoutError):
            pass
        return len(data)

    # -- one request --------------------------------------------------------------

    def _exchange(self, conn: ClientConn, req: http1.Request) -> bool:
        """Answer one request; returns whether the client connection stays open."""
        started = time.monotonic()
        req_id = http1.request_id(req.headers)
        out = Outcome(bytes_in=conn.head_len)
        sent_before = conn.bytes_out
        match = self.index.lookup(req.host)
        # an answer of our own leaves any request body unread: then we must close
        can_keep = req.keep_alive and not req.framing.has_body and not self.draining
        refusal = admission.admit(
            req, match, routes_loaded=self.index.loaded, buffered=conn.buf[:BUFSIZE],
            can_keep=can_keep, request_id=req_id,
            retry_after=self.s.maintenance_retry_after)
        if match is None:
            assert refusal is not None
            out.status, out.keep_alive = refusal.status, refusal.keep_alive
            out.bytes = self._send_raw(conn, refusal.page)
            if refusal.reason == "unknown_host":
                log.info("unknown host", extra={"host_name": req.host,
                                                "request_id": req_id})
            self.stats.record(None, refusal.status, out.bytes_in,
                              conn.bytes_out - sent_before,
                              (time.monotonic() - started) * 1000)
            return out.keep_alive
        conn.app = self.stats.attach(conn.app, match.app)
        try:
            if refusal is not None:
                out.status, out.keep_alive = refusal.status, refusal.keep_alive
                out.bytes = self._send_raw(conn, refusal.page)
                return out.keep_alive
            self._forward(conn, req, match, req_id, out)
            return out.keep_alive
        finally:
            ms = (time.monotonic() - started) * 1000
            self.stats.record(match.app, out.status or 499, out.bytes_in,
                              conn.bytes_out - sent_before, ms)
            self.access_log(match.app, (
                f"method={req.method} path={req.target} status={out.status} "
                f"bytes={out.bytes} ms={ms:.1f} request_id={req_id} "
                f"client={conn.addr[0]} backend={out.backend}"))

    def _forward(self, conn: ClientConn, req: http1.Request, match: Any,
                 req_id: str, out: Outcome) -> None:
        app, entries = match.app, match.backends
        static = admission.static_target(req, match)
        if static is not None:
            entries = static.backends
        head = http1.backend_request_head(req, client_addr=conn.addr[0],
                                          port=self.s.listen_port, req_id=req_id,
                                          trusted=conn.addr[0] in self.trusted,
                                          static=static.header if static else None)
        can_keep = req.keep_alive and not req.framing.has_body and not self.draining
        tried: set[str] = set()
        retries = 0
        fresh_only = False
        while True:
            backend = self.pool.choose(entries, tried, time.monotonic(),
                                       up_only=static is not None)
            if backend is None and static is not None:
                # no static file server answers: the app's own instances do (Django's
                # stopgap middleware serves the same files)
                static, entries = None, match.backends
                head = http1.backend_request_head(req, client_addr=conn.addr[0],
                                                  port=self.s.listen_port, req_id=req_id,
                                                  trusted=conn.addr[0] in self.trusted)
                continue
            if backend is None:
                out.status, out.keep_alive = 502, can_keep
                out.bytes = self._send_page(
                    conn, 502, f"None of the instances of {app!r} accepted a connection.",
                    "The app may be restarting or crashing; check `berth logs` and "
                    "retry in a few seconds.", req, req_id, can_keep)
                return
            bsock, reused = self._backend_socket(
                backend, fresh_only, retryable=req.idempotent and not req.framing.has_body)
            fresh_only = False
            if bsock is None:
                tried.add(backend.key)
                continue
            out.backend = backend.key
            self.pool.acquire(backend)
            try:
                self._attempt(conn, req, head, backend, bsock, reused,
                              retries < MAX_RETRIES, req_id, out, match.max_body)
                return
            except Retry:
                # idempotent and bodiless, and nothing came back: safe to send again.
                # A reused connection may just have timed out at the backend: retry
                # on a fresh one. A fresh one dying means the instance is in trouble.
                retries += 1
                if reused:
                    fresh_only = True
                else:
                    tried.add(backend.key)
                    self.pool.mark_down(backend, time.monotonic())
                log.info("backend closed the connection before answering; retrying",
                         extra={"backend": backend.key, "reused": reused,
                                "request_id": req_id})
            finally:
                self.pool.release(backend)

    def _backend_socket(self, backend: Backend, fresh_only: bool,
                        retryable: bool = False) -> tuple[Any, bool]:
        """(socket, reused) from the pool, else a new connection; (None, False) and
        the backend marked down when it cannot be reached. `retryable`: the request
        may be sent again if a reused connection turns out closed."""
        if not fresh_only:
            while True:
                sock, idle_for, expired = self.pool.take_idle_aged(
                    backend, time.monotonic())
                for old in expired:
                    close(old)
                if sock is None:
                    break
                # back in the pool a moment ago: no backend closes (or sends an
                # unasked 408) that fast, and for a retryable request the Retry
                # path covers a close anyway; otherwise probe it
                if (retryable and idle_for < FRESH_IDLE) or _still_open(sock):
                    return sock, True
                close(sock)
        try:
            sock = gsocket.create_connection((backend.address, backend.port),
                                             timeout=self.s.connect_timeout)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            backoff = self.pool.mark_down(backend, time.monotonic())
            log.warning("backend unreachable; marked down",
                        extra={"backend": backend.key, "error": str(exc),
                               "backoff": f"{backoff:g}"})
            return None, False
        self.pool.mark_up(backend)
        return sock, False

    def _attempt(self, conn: ClientConn, req: http1.Request, head: bytes,
                 backend: Backend, bsock: Any, reused: bool, may_retry: bool,
                 req_id: str, out: Outcome, max_body: int = 0) -> None:
        retryable = may_retry and req.idempotent and not req.framing.has_body
        state = PumpState(time.monotonic() + self.s.response_timeout)
        pump = None
        reusable = False
        framing = req.framing
        if framing.kind == "length" and framing.length <= len(conn.buf) and \
                framing.length <= BUFSIZE:
            # the whole (small) body is already here: one send, no pump
            body, conn.buf = conn.buf[:framing.length], conn.buf[framing.length:]
            head += body
            state.body_bytes = len(body)
            framing = http1.NO_BODY
        try:
            try:
                send(bsock, head, self.s.response_timeout)
            except (OSError, TimeoutError):
                if retryable:
                    raise Retry() from None
                raise BackendError("the app's connection failed while sending the "
                                   "request") from None
            if framing.has_body:
                pump = eventlet.spawn(self._pump_request, conn, req, bsock, state,
                                      max_body)
            else:
                state.done = True
            resp, rest = self._read_response_head(conn, req, bsock, state, retryable)
            if resp.status == 101:
                self._tunnel(conn, resp, rest, bsock, out)
                return
            while retryable and http1.hold_for_body(resp, len(rest)):
                try:
                    more = recv(bsock, self.s.response_timeout)
                except (OSError, TimeoutError):
                    more = b""
                if not more:
                    raise Retry()     # died before its whole (small) answer: not sent yet
                rest += more
            reusable = self._relay_response(conn, req, resp, rest, bsock, req_id, out)
            if req.upgrade:
                reusable = False      # the app declined; do not trust its state
            if pump is not None and not state.done:
                try:
                    with eventlet.Timeout(PUMP_GRACE, TimeoutError):
                        pump.wait()
                except TimeoutError:
                    pass
            if not state.done or state.error is not None:
                out.keep_alive = False
                reusable = False
        except BackendError as exc:
            out.bytes_in += state.body_bytes
            reusable = False
            if isinstance(state.error, ClientGone):
                out.keep_alive = False
                return
            if isinstance(state.error, BadRequest):
                out.status = state.error.status
                log.info("request refused while streaming its body",
                         extra={"status": out.status, "error": state.error.message,
                                "request_id": req_id})
                out.bytes = self._send_page(conn, out.status, state.error.message,
                                            state.error.hint, req, req_id)
                out.keep_alive = False
                return
            out.status = exc.status
            log.warning("backend failed", extra={"backend": backend.key,
                                                 "error": exc.message,
                                                 "request_id": req_id})
            out.bytes = self._send_page(conn, exc.status, exc.message, exc.hint, req,
                                        req_id)
            out.keep_alive = False
        else:
            out.bytes_in += state.body_bytes
        finally:
            if pump is not None and not pump.dead:
                pump.kill()
            if reusable and not self.draining:
                for extra in self.pool.put_idle(backend, bsock, time.monotonic()):
                    close(extra)
            else:
                close(bsock)

    def _pump_request(self, conn: ClientConn, req: http1.Request, bsock: Any,
                      state: PumpState, max_body: int = 0) -> None:
        """Stream the request body client -> backend (its own green thread). A
        chunked body is counted against max_body before each piece is sent, so one
        over the limit sends the backend nothing past it (413 if no response started,
        else the connection closes)."""
        limit = http1.BodyLimit(max_body)
        try:
            if req.framing.kind == "length":
                remaining = req.framing.length
                while remaining:
                    data, conn.buf = conn.buf, b""
                    if not data:
                        data = recv(conn.sock, self.s.idle_timeout)
                        if not data:
                            raise ClientGone()
                    piece, conn.buf = data[:remaining], data[remaining:] + conn.buf
                    remaining -= len(piece)
                    state.body_bytes += len(piece)
                    send(bsock, piece, self.s.response_timeout)
                    state.deadline = time.monotonic() + self.s.response_timeout
            else:
                decoder = http1.ChunkedDecoder()
                data, conn.buf = conn.buf, b""
                while True:
                    if data:
                        pieces = decoder.feed(data)
                        for piece in pieces:
                            limit.add(len(piece))
                        state.body_bytes += len(data) - len(decoder.leftover)
                        out = b"".join(http1.encode_chunk(p) for p in pieces)
                        if decoder.done:
                            out += http1.LAST_CHUNK
                            conn.buf = decoder.leftover
                        if out:
                            send(bsock, out, self.s.response_timeout)
                            state.deadline = time.monotonic() + self.s.response_timeout
                        if decoder.done:
                            break
                    data = recv(conn.sock, self.s.idle_timeout)
                    if not data:
                        raise ClientGone()
            state.done = True
        except TimeoutError:
            state.error = ClientGone()
            _abort(bsock)
        except (BadRequest, ClientGone) as exc:
            state.error = exc
            _abort(bsock)
        except OSError as exc:
            # the backend stopped reading; its response (if any) still counts
            state.error = exc

    def _read_response_head(self, conn: ClientConn, req: http1.Request, bsock: Any,
                            state: PumpState, retryable: bool
                            ) -> tuple[http1.Response, bytes]:
        """Wait for the final response head, relaying 1xx to the client."""
        buf = b""
        got_any = False
        while True:
            found = http1.find_head(buf, 1 << 20) if buf else None
            if found:
                start, end = found
                resp = http1.parse_response(buf[start:end], req.method)
                buf = buf[end:]
                if resp.status == 101:
                    if req.upgrade:
                        return resp, buf
                    raise BackendError("the app switched protocols though the "
                                       "client did not ask to")
                if resp.interim:
                    if req.version >= (1, 1):
                        self._to_client(conn, http1.client_response_head(
                            resp, framing_out="none", keep_alive=True, req_id=""))
                    continue
                return resp, buf
            remaining = state.deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError("the app did not answer in time",
                                   f"the app must start its response within "
                                   f"{self.s.response_timeout:g} seconds; look for "
                                   "slow requests in `berth logs`", status=504)
            try:
                data = recv(bsock, min(remaining, 1.0))
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                if not got_any and retryable:
                    raise Retry()
                raise BackendError("the app closed the connection without a "
                                   "complete response",
                                   "the app may have crashed; check `berth logs`")
            got_any = True
            buf += data

    def _relay_response(self, conn: ClientConn, req: http1.Request,
                        resp: http1.Response, rest: bytes, bsock: Any, req_id: str,
                        out: Outcome) -> bool:
        """Send the response to the client; returns whether the backend connection
        may be reused."""
        kind = resp.framing.kind
        if kind in ("chunked", "close"):
            framing_out = "chunked" if req.version >= (1, 1) else "close"
        else:
            framing_out = kind
        keep = req.keep_alive and framing_out != "close" and not self.draining
        out.status, out.keep_alive = resp.status, keep
        head = http1.client_response_head(resp, framing_out=framing_out,
                                          keep_alive=keep, req_id=req_id)
        if kind == "length" and len(rest) >= resp.framing.length:
            # the whole body is already here: head and body in one send
            piece = rest[:resp.framing.length]
            self._to_client(conn, head + piece)
            out.bytes += len(piece)
            return resp.keep_alive and len(rest) == len(piece)
        self._to_client(conn, head)
        chunked_out = framing_out == "chunked"
        if kind == "none":
            return resp.keep_alive and not rest
        if kind == "length":
            remaining = resp.framing.length
            data = rest
            while True:
                piece = data[:remaining]
                if piece:
                    self._to_client(conn, piece)
                    out.bytes += len(piece)
                    remaining -= len(piece)
                if remaining == 0:
                    return resp.keep_alive and len(data) == len(piece)
                data = self._from_backend(bsock)
                if not data:
                    raise ClientGone()   # truncated by the app: the client sees a short body
        decoder = http1.ChunkedDecoder() if kind == "chunked" else None
        data = rest
        while True:
            if data:
                if decoder is not None:
                    try:
                        pieces = decoder.feed(data)
                    except BadRequest:
                        raise ClientGone() from None   # bad chunking from the app
                else:
                    pieces = [data]
                payload = b"".join(http1.encode_chunk(p) if chunked_out else p
                                   for p in pieces)
                out.bytes += sum(len(p) for p in pieces)
                if decoder is not None and decoder.done:
                    if chunked_out:
                        payload += http1.LAST_CHUNK
                    if payload:
                        self._to_client(conn, payload)
                    return resp.keep_alive and not decoder.leftover
                if payload:
                    self._to_client(conn, payload)
            data = self._from_backend(bsock)
            if not data:
                if decoder is not None:
                    raise ClientGone()       # chunked body cut short
                if chunked_out:
                    self._to_client(conn, http1.LAST_CHUNK)
                return False

    def _tunnel(self, conn: ClientConn, resp: http1.Response, rest: bytes,
                bsock: Any, out: Outcome) -> None:
        """After a 101: copy bytes both ways until either side closes or no byte
        moves for ws_idle_timeout. The client connection ends with the tunnel."""
        out.status, out.keep_alive = 101, False
        self._to_client(conn, http1.client_response_head(
            resp, framing_out="none", keep_alive=True, req_id=""))
        idle = self.s.ws_idle_timeout
        last = [time.monotonic()]
        counts = [0, 0]

        def copy(src: Any, dst: Any, first: bytes, slot: int) -> None:
            try:
                data = first
                while True:
                    if data:
                        send(dst, data, idle)    # a peer not reading for `idle` ends it
                        counts[slot] += len(data)
                        last[0] = time.monotonic()
                    try:
                        data = recv(src, last[0] + idle - time.monotonic())
                    except TimeoutError:
                        if time.monotonic() - last[0] < idle:
                            data = b""
                            continue      # the other direction kept it alive
                        return
                    if not data:
                        return
            except OSError:
                return
            finally:
                for sock in (src, dst):
                    _abort(sock)      # wakes the other direction up

        pending, conn.buf = conn.buf, b""
        up = eventlet.spawn(copy, conn.sock, bsock, pending, 0)
        down = eventlet.spawn(copy, bsock, conn.sock, rest, 1)
        try:
            up.wait()
            down.wait()
        finally:
            for thread in (up, down):
                if not thread.dead:
                    thread.kill()
            out.bytes_in += counts[0]
            out.bytes = counts[1]
            conn.bytes_out += counts[1]

    def _from_backend(self, bsock: Any) -> bytes:
        try:
            return recv(bsock, self.s.response_timeout)
        except (OSError, TimeoutError):
            raise ClientGone() from None   # head already sent: all we can do is close

    def _to_client(self, conn: ClientConn, data: bytes) -> None:
        try:
            send(conn.sock, data, self.s.idle_timeout)
            conn.bytes_out += len(data)
        except (OSError, TimeoutError):
            raise ClientGone() from None


def _has_bytes(sock: Any) -> bool:
    """Bytes wait unread on the socket (a request is arriving)."""
    raw = getattr(sock, "fd", sock)
    try:
        return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _still_open(sock: Any) -> bool:
    """An idle pooled connection is usable if it has neither closed nor sent
    anything unasked."""
    raw = getattr(sock, "fd", sock)
    try:
        raw.recv(1, _PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False   # closed (b"") or unexpected bytes: either way not reusable


def _abort(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
