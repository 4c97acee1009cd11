"""The life of a client connection and of each request on it, written once for
both engines.

Per request: read and parse the head; admission; pick a backend and get a
connection (pooled or fresh, trying another backend when a connect fails); send
the head (with the body when all of a small one is already here); stream the
request body in a second task while this one waits for the response head (so
100-continue and early answers work); stream the response body back; return the
backend connection to the pool when it is clean. An upgrade request answered with
101 becomes a tunnel: two tasks copy bytes each way until one side closes or
ws_idle_timeout passes with no byte.

The code is coroutines that await a handful of engine operations (a stream's
recv/send, engine.connect, engine.spawn and a task's join); engines.py says what
an engine provides. On asyncio these awaits suspend as usual. On eventlet they
never suspend (each blocks its green thread instead), and green.drive runs a
coroutine to its end in one call. Decisions (parsing, framing, admission, backend
choice, pages) are I/O-free in http1.py, admission.py, pool.py and pages.py.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from types import SimpleNamespace
from typing import Any, Final

from balancer import admission, http1, pages
from balancer.engines import Engine, Stream, Task
from balancer.errors import BackendError, BadRequest
from balancer.pool import Backend, Pool
from balancer.routes import RouteIndex
from balancer.stats import Stats

log: Final = logging.getLogger(__name__)

MAX_RETRIES: Final = 2     # resends of an idempotent bodiless request nothing answered
PUMP_GRACE: Final = 2.0    # seconds the request body pump may lag behind a finished response
FRESH_IDLE: Final = 0.01   # seconds a pooled connection may idle and be reused unprobed
SMALL_BODY: Final = 65536  # a request body this small, all read, leaves with its head
MAX_RESPONSE_HEAD: Final = 1 << 20


class ClientGone(Exception):
    """The client closed or stalled; nothing more can be said to it."""


class Retry(Exception):
    """The backend connection died before any response byte reached the client."""


class Outcome:
    """What became of one request (for the stats and the access log)."""

    def __init__(self, bytes_in: int = 0) -> None:
        self.status = 0
        self.bytes = 0
        self.backend = "-"
        self.keep_alive = False
        self.bytes_in = bytes_in       # request head and body bytes read from the client


class PumpState:
    """Shared between the response reader and the request body pump."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline      # for the response head; the pump pushes it on
        self.done = False
        self.error: BaseException | None = None
        self.body_bytes = 0           # request body bytes read from the client


class ClientConn:
    __slots__ = ("stream", "addr", "buf", "busy", "accepted", "app", "head_len",
                 "bytes_out", "requests")

    def __init__(self, stream: Stream, addr: tuple[str, int]) -> None:
        self.stream = stream
        self.addr = addr
        self.buf = b""
        self.busy = False
        self.accepted = monotonic()
        self.app: str | None = None     # the app its latest request went to (stats)
        self.head_len = 0               # size of the latest request head
        self.bytes_out = 0              # every byte written to the client
        self.requests = 0               # request heads read so far


class Proxy:
    def __init__(self, settings: SimpleNamespace, engine: Engine, index: RouteIndex,
                 pool: Pool, access_log: Callable[[str, str], None] | None = None,
                 stats: Stats | None = None) -> None:
        self.s = settings
        # the settings each request reads, as native attributes (a SimpleNamespace
        # attribute is a generic lookup under mypyc); fixed for a worker's life
        self.header_timeout = float(settings.header_timeout)
        self.idle_timeout = float(settings.idle_timeout)
        self.response_timeout = float(settings.response_timeout)
        self.max_header_bytes = int(settings.max_header_bytes)
        self.engine = engine
        self.index = index
        self.pool = pool
        self.access_log = access_log or (lambda app, line: None)
        self.stats = stats or Stats()
        self.trusted = http1.TrustedProxies(settings.trusted_proxies)
        self.connections: set[ClientConn] = set()
        self.draining = False

    # -- client connection --------------------------------------------------------

    def accept(self, stream: Stream, addr: tuple[str, int]) -> ClientConn:
        """Count a new client connection (at once, so a drain sees it); the engine
        then runs handle() for it."""
        conn = ClientConn(stream, addr)
        self.connections.add(conn)
        self.stats.connection_opened()
        return conn

    async def handle(self, conn: ClientConn) -> None:
        """Serve one client connection until it closes (task entry)."""
        try:
            await self._serve(conn)
        except (OSError, ClientGone):
            pass
        except Exception:
            log.exception("connection failed", extra={"client": conn.addr[0]})
        finally:
            self.connections.discard(conn)
            self.stats.connection_closed(conn.app)
            conn.stream.close()

    def drain_idle(self) -> None:
        """On shutdown: close connections waiting for a next request. A connection
        accepted just before the listener closed has a first request on its way
        (and one whose bytes arrived unread is not waiting either): it is left to
        answer it, or to give up after header_timeout."""
        for conn in list(self.connections):
            if not conn.busy and conn.requests and not conn.buf \
                    and not conn.stream.has_bytes():
                conn.stream.abort()

    async def _serve(self, conn: ClientConn) -> None:
        first = True
        while True:
            try:
                req = await self._read_request(conn, first)
            except BadRequest as exc:
                sent = await self._send_page(conn, exc.status, exc.message, exc.hint,
                                             None, "")
                self.stats.record(None, exc.status, len(conn.buf), sent, 0.0)
                return
            if req is None:
                return
            conn.busy = True
            conn.requests += 1
            keep = await self._exchange(conn, req)
            conn.busy = bool(conn.buf)
            if not keep or self.draining:
                return
            first = False

    async def _read_request(self, conn: ClientConn, first: bool
                            ) -> http1.Request | None:
        """The next request head; None when the client closed or idled out."""
        if first:
            deadline = conn.accepted + self.header_timeout
        else:
            if not conn.buf:
                try:
                    data = await conn.stream.recv(self.idle_timeout)
                except TimeoutError:
                    return None
                if not data:
                    return None
                conn.buf = data
            deadline = monotonic() + self.header_timeout
        while True:
            found = http1.find_head(conn.buf, self.max_header_bytes)
            if found:
                start, end = found
                head, conn.buf = conn.buf[start:end], conn.buf[end:]
                conn.head_len = end
                return http1.parse_request(head)
            try:
                data = await conn.stream.recv(deadline - monotonic())
            except TimeoutError:
                if conn.buf.strip(b"\r\n"):
                    raise BadRequest("the request head did not arrive in time",
                                     f"send the whole head within "
                                     f"{self.header_timeout:g} seconds",
                                     status=408) from None
                return None
            if not data:
                return None
            conn.buf += data
            conn.busy = True

    async def _send_page(self, conn: ClientConn, status: int, message: str, hint: str,
                         req: http1.Request | None, req_id: str,
                         keep: bool = False) -> int:
        return await self._send_raw(conn, pages.render(
            status, message, hint, accept=req.headers.get("accept") if req else None,
            request_id=req_id, keep_alive=keep, head_only=bool(req and req.method == "HEAD")))

    async def _send_raw(self, conn: ClientConn, data: bytes) -> int:
        """Send an answer of our own; a client that went away is no error here."""
        try:
            await conn.stream.send(data, self.idle_timeout)
            conn.bytes_out += len(data)
        except OSError:
            pass
        return len(data)

    # -- one request --------------------------------------------------------------

    async def _exchange(self, conn: ClientConn, req: http1.Request) -> bool:
        """Answer one request; returns whether the client connection stays open."""
        started = monotonic()
        req_id = http1.request_id(req.headers)
        out = Outcome(bytes_in=conn.head_len)
        sent_before = conn.bytes_out
        match = self.index.lookup(req.host)
        # an answer of our own leaves any request body unread: then we must close
        can_keep = req.keep_alive and not req.framing.has_body and not self.draining
        refusal = admission.admit(
            req, match, routes_loaded=self.index.loaded, buffered=conn.buf[:SMALL_BODY],
            can_keep=can_keep, request_id=req_id,
            retry_after=self.s.maintenance_retry_after)
        if match is None:
            assert refusal is not None
            out.status, out.keep_alive = refusal.status, refusal.keep_alive
            out.bytes = await self._send_raw(conn, refusal.page)
            if refusal.reason == "unknown_host":
                log.info("unknown host", extra={"host_name": req.host,
                                                "request_id": req_id})
            self.stats.record(None, refusal.status, out.bytes_in,
                              conn.bytes_out - sent_before,
                              (monotonic() - started) * 1000)
            return out.keep_alive
        conn.app = self.stats.attach(conn.app, match.app)
        try:
            if refusal is not None:
                out.status, out.keep_alive = refusal.status, refusal.keep_alive
                out.bytes = await self._send_raw(conn, refusal.page)
                return out.keep_alive
            await self._forward(conn, req, match, req_id, out)
            return out.keep_alive
        finally:
            ms = (monotonic() - started) * 1000
            self.stats.record(match.app, out.status or 499, out.bytes_in,
                              conn.bytes_out - sent_before, ms)
            # ms to one decimal in integers: a format spec ({ms:.1f}) is a generic
            # str.format call under mypyc, and in one f-string with the rest it
            # makes every field one
            tenths = int(ms * 10 + 0.5)
            self.access_log(match.app, (
                f"method={req.method} path={req.target} status={out.status} "
                f"bytes={out.bytes} ms={tenths // 10}.{tenths % 10} request_id={req_id} "
                f"client={conn.addr[0]} backend={out.backend}"))

    async def _forward(self, conn: ClientConn, req: http1.Request, match: Any,
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
            backend = self.pool.choose(entries, tried, monotonic(),
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
                out.bytes = await self._send_page(
                    conn, 502, f"None of the instances of {app!r} accepted a connection.",
                    "The app may be restarting or crashing; check `berth logs` and "
                    "retry in a few seconds.", req, req_id, can_keep)
                return
            bconn, reused = await self._backend_conn(
                backend, fresh_only, retryable=req.idempotent and not req.framing.has_body)
            fresh_only = False
            if bconn is None:
                tried.add(backend.key)
                continue
            out.backend = backend.key
            self.pool.acquire(backend)
            try:
                await self._attempt(conn, req, head, backend, bconn, reused,
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
                    self.pool.mark_down(backend, monotonic())
                log.info("backend closed the connection before answering; retrying",
                         extra={"backend": backend.key, "reused": reused,
                                "request_id": req_id})
            finally:
                self.pool.release(backend)

    async def _backend_conn(self, backend: Backend, fresh_only: bool,
                            retryable: bool = False) -> tuple[Stream | None, bool]:
        """(connection, reused) from the pool, else a new one; (None, False) and
        the backend marked down when it cannot be reached. `retryable`: the request
        may be sent again if a reused connection turns out closed."""
        if not fresh_only:
            while True:
                bconn, idle_for, expired = self.pool.take_idle_aged(
                    backend, monotonic())
                for old in expired:
                    old.close()
                if bconn is None:
                    break
                # back in the pool a moment ago: no backend closes (or sends an
                # unasked 408) that fast, and for a retryable request the Retry
                # path covers a close anyway, so the engine need not spend a
                # syscall to look (it still looks where looking is free)
                if bconn.reusable(probe=not (retryable and idle_for < FRESH_IDLE)):
                    return bconn, True
                bconn.close()
        try:
            bconn = await self.engine.connect(backend.address, backend.port,
                                              self.s.connect_timeout)
        except OSError as exc:      # TimeoutError included
            backoff = self.pool.mark_down(backend, monotonic())
            log.warning("backend unreachable; marked down",
                        extra={"backend": backend.key,
                               "error": str(exc) or type(exc).__name__,
                               "backoff": f"{backoff:g}"})
            return None, False
        self.pool.mark_up(backend)
        return bconn, False

    async def _attempt(self, conn: ClientConn, req: http1.Request, head: bytes,
                       backend: Backend, bconn: Stream, reused: bool,
                       may_retry: bool, req_id: str, out: Outcome,
                       max_body: int = 0) -> None:
        retryable = may_retry and req.idempotent and not req.framing.has_body
        state = PumpState(monotonic() + self.response_timeout)
        pump: Task | None = None
        reusable = False
        framing = req.framing
        if framing.kind == "length" and framing.length <= len(conn.buf) and \
                framing.length <= SMALL_BODY:
            # the whole (small) body is already here: one send, no pump
            body, conn.buf = conn.buf[:framing.length], conn.buf[framing.length:]
            head += body
            state.body_bytes = len(body)
            framing = http1.NO_BODY
        try:
            try:
                await bconn.send(head, self.response_timeout)
            except OSError:
                if retryable:
                    raise Retry() from None
                raise BackendError("the app's connection failed while sending the "
                                   "request") from None
            if framing.has_body:
                pump = self.engine.spawn(self._pump_request(conn, req, bconn, state,
                                                            max_body))
            else:
                state.done = True
            resp, rest = await self._read_response_head(conn, req, bconn, state,
                                                        retryable)
            if resp.status == 101:
                await self._tunnel(conn, resp, rest, bconn, out)
                return
            while retryable and http1.hold_for_body(resp, len(rest)):
                try:
                    more = await bconn.recv(self.response_timeout)
                except OSError:
                    more = b""
                if not more:
                    raise Retry()     # died before its whole (small) answer: not sent yet
                rest += more
            reusable = await self._relay_response(conn, req, resp, rest, bconn,
                                                  req_id, out)
            if req.upgrade:
                reusable = False      # the app declined; do not trust its state
            if pump is not None and not state.done:
                try:
                    await pump.join(PUMP_GRACE)
                except TimeoutError:
                    pass
            if not state.done or state.error is not None:
                out.keep_alive = False
                reusable = False
        except BackendError as exc:
            out.bytes_in += state.body_bytes
            reusable = False
            await self._answer_failure(conn, req, req_id, backend, state, exc, out)
        else:
            out.bytes_in += state.body_bytes
        finally:
            if pump is not None:
                pump.cancel()
            if reusable and not self.draining:
                for extra in self.pool.put_idle(backend, bconn, monotonic()):
                    extra.close()
            else:
                bconn.close()

    async def _answer_failure(self, conn: ClientConn, req: http1.Request, req_id: str,
                              backend: Backend, state: PumpState, exc: BackendError,
                              out: Outcome) -> None:
        """Nothing of the response reached the client: say why, and close."""
        out.keep_alive = False
        if isinstance(state.error, ClientGone):
            return
        if isinstance(state.error, BadRequest):
            out.status = state.error.status
            log.info("request refused while streaming its body",
                     extra={"status": out.status, "error": state.error.message,
                            "request_id": req_id})
            out.bytes = await self._send_page(conn, out.status, state.error.message,
                                              state.error.hint, req, req_id)
            return
        out.status = exc.status
        log.warning("backend failed", extra={"backend": backend.key,
                                             "error": exc.message,
                                             "request_id": req_id})
        out.bytes = await self._send_page(conn, exc.status, exc.message, exc.hint,
                                          req, req_id)

    async def _pump_request(self, conn: ClientConn, req: http1.Request, bconn: Stream,
                            state: PumpState, max_body: int = 0) -> None:
        """Stream the request body client -> backend (its own task). A chunked body
        is counted against max_body before each piece is sent, so one over the limit
        sends the backend nothing past it (413 if no response started, else the
        connection closes)."""
        limit = http1.BodyLimit(max_body)
        client = conn.stream
        try:
            if req.framing.kind == "length":
                remaining = req.framing.length
                while remaining:
                    data, conn.buf = conn.buf, b""
                    if not data:
                        data = await client.recv(self.idle_timeout)
                        if not data:
                            raise ClientGone()
                    piece, conn.buf = data[:remaining], data[remaining:] + conn.buf
                    remaining -= len(piece)
                    state.body_bytes += len(piece)
                    await bconn.send(piece, self.response_timeout)
                    state.deadline = monotonic() + self.response_timeout
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
                            await bconn.send(out, self.response_timeout)
                            state.deadline = monotonic() + self.response_timeout
                        if decoder.done:
                            break
                    data = await client.recv(self.idle_timeout)
                    if not data:
                        raise ClientGone()
            state.done = True
        except TimeoutError:
            state.error = ClientGone()
            bconn.abort()
        except (BadRequest, ClientGone) as exc:
            state.error = exc
            bconn.abort()
        except OSError as exc:
            # the backend stopped reading; its response (if any) still counts
            state.error = exc

    async def _read_response_head(self, conn: ClientConn, req: http1.Request,
                                  bconn: Stream, state: PumpState, retryable: bool
                                  ) -> tuple[http1.Response, bytes]:
        """Wait for the final response head, relaying 1xx to the client."""
        buf = b""
        got_any = False
        while True:
            found = http1.find_head(buf, MAX_RESPONSE_HEAD) if buf else None
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
                        await self._to_client(conn, http1.client_response_head(
                            resp, framing_out="none", keep_alive=True, req_id=""))
                    continue
                return resp, buf
            remaining = state.deadline - monotonic()
            if remaining <= 0:
                raise BackendError("the app did not answer in time",
                                   f"the app must start its response within "
                                   f"{self.response_timeout:g} seconds; look for "
                                   "slow requests in `berth logs`", status=504)
            try:
                data = await bconn.recv(min(remaining, 1.0))
            except TimeoutError:
                continue
            except OSError:
                data = b""        # reset by the backend: as closed
            if not data:
                if not got_any and retryable:
                    raise Retry()
                raise BackendError("the app closed the connection without a "
                                   "complete response",
                                   "the app may have crashed; check `berth logs`")
            got_any = True
            buf += data

    async def _relay_response(self, conn: ClientConn, req: http1.Request,
                              resp: http1.Response, rest: bytes, bconn: Stream,
                              req_id: str, out: Outcome) -> bool:
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
            await self._to_client(conn, head + piece)
            out.bytes += len(piece)
            return resp.keep_alive and len(rest) == len(piece)
        await self._to_client(conn, head)
        if kind == "none":
            return resp.keep_alive and not rest
        if kind == "length":
            remaining = resp.framing.length - len(rest)   # rest is short of it here
            if rest:
                await self._to_client(conn, rest)
                out.bytes += len(rest)
            moved, clean = await bconn.pipe(conn.stream, remaining,
                                            self.response_timeout, self.idle_timeout)
            out.bytes += moved
            conn.bytes_out += moved
            if moved < remaining:
                raise ClientGone()   # cut short (the app, the client or a timeout)
            return resp.keep_alive and clean
        return await self._relay_unsized(conn, resp, rest, bconn,
                                         framing_out == "chunked", out)

    async def _relay_unsized(self, conn: ClientConn, resp: http1.Response, rest: bytes,
                             bconn: Stream, chunked_out: bool, out: Outcome) -> bool:
        """A chunked or close-delimited response body, re-chunked for a 1.1 client."""
        decoder = http1.ChunkedDecoder() if resp.framing.kind == "chunked" else None
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
                        await self._to_client(conn, payload)
                    return resp.keep_alive and not decoder.leftover
                if payload:
                    await self._to_client(conn, payload)
            data = await self._from_backend(bconn)
            if not data:
                if decoder is not None:
                    raise ClientGone()       # chunked body cut short
                if chunked_out:
                    await self._to_client(conn, http1.LAST_CHUNK)
                return False

    async def _tunnel(self, conn: ClientConn, resp: http1.Response, rest: bytes,
                      bconn: Stream, out: Outcome) -> None:
        """After a 101: copy bytes both ways until either side closes or no byte
        moves for ws_idle_timeout. The client connection ends with the tunnel."""
        out.status, out.keep_alive = 101, False
        await self._to_client(conn, http1.client_response_head(
            resp, framing_out="none", keep_alive=True, req_id=""))
        idle = self.s.ws_idle_timeout
        last = [monotonic()]
        counts = [0, 0]

        async def copy(src: Stream, dst: Stream, first: bytes, slot: int) -> None:
            try:
                data = first
                while True:
                    if data:
                        await dst.send(data, idle)  # a peer not reading for `idle` ends it
                        counts[slot] += len(data)
                        last[0] = monotonic()
                    try:
                        data = await src.recv(last[0] + idle - monotonic())
                    except TimeoutError:
                        if monotonic() - last[0] < idle:
                            data = b""
                            continue      # the other direction kept it alive
                        return
                    if not data:
                        return
            except OSError:
                return
            finally:
                # after what is queued, end both: wakes the other direction up
                src.finish()
                dst.finish()

        pending, conn.buf = conn.buf, b""
        up = self.engine.spawn(copy(conn.stream, bconn, pending, 0))
        down = self.engine.spawn(copy(bconn, conn.stream, rest, 1))
        try:
            await up.join()
            await down.join()
        finally:
            up.cancel()
            down.cancel()
            out.bytes_in += counts[0]
            out.bytes = counts[1]
            conn.bytes_out += counts[1]

    async def _from_backend(self, bconn: Stream) -> bytes:
        try:
            return await bconn.recv(self.response_timeout)
        except OSError:
            raise ClientGone() from None   # head already sent: all we can do is close

    async def _to_client(self, conn: ClientConn, data: bytes) -> None:
        try:
            await conn.stream.send(data, self.idle_timeout)
            conn.bytes_out += len(data)
        except OSError:
            raise ClientGone() from None
