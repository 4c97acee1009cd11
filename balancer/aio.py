"""The asyncio engine (engine: asyncio, on uvloop when installed): protocols,
tasks and the loop's timers under the balancer's shared coroutines (see
engines.py).

A connection is a small asyncio.Protocol instead of asyncio streams: reads hand
back whatever arrived (like a socket recv), a read that finds data buffered
returns without suspending, and a timeout costs one timer handle instead of a
wait_for task wrapper. Flow control both ways: reading pauses past READ_HIGH
buffered bytes, and a write waits when the transport says its buffer is full. A
Content-Length body moves through Stream.pipe inside the protocol callbacks.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

import zmq
import zmq.asyncio

from messaging.envelope import Message, recv_async, send_async

READ_HIGH: Final = 1 << 19      # buffered bytes past which the transport stops reading
READ_LOW: Final = 1 << 17       # ... and below which it reads again
JOIN_MAX: Final = 1 << 16       # buffered pieces up to this size are handed back joined


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Stream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.loop: Any = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False          # the peer sent FIN (or the connection is gone)
        self.closed = False       # connection_lost happened
        self.read_paused = False
        self.write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0      # loop time at which the pending recv times out
        self._timer: Any = None   # one timer per stream, re-armed lazily (_recv_timer)
        self._timer_at = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._pipe: _Pipe | None = None       # a body this stream is the source of
        self._feeding: _Pipe | None = None    # a body written into this stream

    # -- protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()   # asked once: each ask costs a getpid()

    def data_received(self, data: bytes) -> None:
        if self._pipe is not None:
            self._pipe.feed(data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_HIGH and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        if self._pipe is not None:
            self._pipe.finish()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True     # keep the write side open: a half-closed client still gets its answer

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = self.eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for pipe in (self._pipe, self._feeding):
            if pipe is not None:
                pipe.finish()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._feeding is not None:
            self._feeding.resume()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- awaitable I/O ----------------------------------------------------------------

    async def recv(self, timeout: float) -> bytes:
        """What is buffered (joined when small, else the first piece), waiting up
        to `timeout` seconds for something; b"" at end of stream; TimeoutError
        past the timeout."""
        if not self.chunks:
            if self.eof:
                return b""
            loop = self.loop
            fut = loop.create_future()
            self._waiter = fut
            # No timer per wait: the stream's one timer fires at or before the
            # deadline and is re-armed then if the wait has moved on (_recv_timer).
            deadline = self._deadline = loop.time() + max(timeout, 0.001)
            if self._timer is None or self._timer_at > deadline:
                self._arm(deadline)
            try:
                await fut
            finally:
                if self._waiter is fut:
                    self._waiter = None
            if not self.chunks:
                return b""
        chunks = self.chunks
        if len(chunks) == 1 or self.buffered <= JOIN_MAX:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.chunks = []
            self.buffered = 0
        else:
            data = chunks.pop(0)      # large pieces one at a time: no copy to join them
            self.buffered -= len(data)
        if self.read_paused and self.buffered <= READ_LOW and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._recv_timer)

    def _recv_timer(self) -> None:
        """The stream's timer: time the pending recv out when its deadline has
        passed, wait on when it is later; with no recv pending, stop."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.closed:
            return
        if self._deadline - self.loop.time() <= 0.001:     # the loop's ms granularity
            waiter.set_exception(TimeoutError())
        else:
            self._arm(self._deadline)

    def write(self, data: bytes) -> None:
        """Queue bytes; ConnectionResetError when the connection is gone. Callers
        that may write a lot await drain() after it."""
        if self.closed or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if not self.write_paused:
            return
        loop = self.loop
        fut = loop.create_future()
        self._drain = fut
        handle = loop.call_later(max(timeout, 0.001), _expire, fut)
        try:
            await fut
        finally:
            handle.cancel()
            if self._drain is fut:
                self._drain = None

    async def send(self, data: bytes, timeout: float) -> None:
        """write() then wait (up to `timeout`) until the peer takes it in."""
        self.write(data)
        if self.write_paused:
            await self.drain(timeout)

    async def pipe(self, dst: Stream, n: int, read_timeout: float,
                   write_timeout: float) -> tuple[int, bool]:
        """Move the next `n` bytes from this stream into `dst`, inside the protocol
        callbacks (no task wakes per piece; reading pauses while `dst` cannot take
        more). Returns (bytes moved, clean): fewer than `n` when this stream ended,
        `dst` failed or nothing moved for the timeout (read_timeout waiting for
        bytes, write_timeout waiting for `dst`); clean is false when bytes past the
        `n` arrived with them."""
        pipe = _Pipe(self, dst, n, read_timeout, write_timeout)
        while self.chunks and pipe.remaining and not pipe.done.done():
            data = self.chunks.pop(0)
            self.buffered -= len(data)
            pipe.feed(data)
        if pipe.remaining and not pipe.done.done() and not self.eof:
            self._pipe, dst._feeding = pipe, pipe
            if self.read_paused:          # paused for the buffer, now emptied
                self.read_paused = False
                pipe.paused = True
                pipe.resume()
            pipe.arm()
            try:
                await pipe.done
            finally:
                self._pipe = dst._feeding = None
                pipe.stop()
        return pipe.moved, pipe.clean

    def has_bytes(self) -> bool:
        return bool(self.chunks)

    def finish(self) -> None:
        self.close()

    def reusable(self, probe: bool = True) -> bool:
        """An idle pooled connection is usable if it has neither closed nor sent
        anything unasked (known without a syscall here: `probe` is moot)."""
        return not (self.eof or self.chunks or self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()     # after what is queued

    def abort(self) -> None:
        """Drop the connection now, unsent bytes too (like shutdown(SHUT_RDWR))."""
        if self.transport is not None:
            self.transport.abort()


class _Pipe:
    """A body moving from one Stream's callbacks straight into another's transport
    (Stream.pipe)."""

    __slots__ = ("src", "dst", "remaining", "moved", "clean", "paused", "last",
                 "timer", "read_timeout", "write_timeout", "loop", "done")

    def __init__(self, src: Stream, dst: Stream, n: int, read_timeout: float,
                 write_timeout: float) -> None:
        self.src, self.dst = src, dst
        self.remaining, self.moved, self.clean = n, 0, True
        self.paused = False           # src reading paused because dst is full
        self.loop = src.loop
        self.last = self.loop.time()
        self.read_timeout, self.write_timeout = read_timeout, write_timeout
        self.timer: Any = None
        self.done: asyncio.Future[None] = self.loop.create_future()

    def feed(self, data: bytes) -> None:
        if self.done.done():          # after the body (or a stop): unasked bytes
            self.clean = False
            self.src.chunks.append(data)
            self.src.buffered += len(data)
            return
        take = data if len(data) <= self.remaining else data[:self.remaining]
        if len(take) < len(data):
            self.clean = False        # bytes past the body: the connection is spoiled
        try:
            self.dst.write(take)
        except ConnectionResetError:
            self.finish()
            return
        self.remaining -= len(take)
        self.moved += len(take)
        self.last = self.loop.time()
        if not self.remaining:
            self.finish()
        elif self.dst.write_paused and not self.paused:
            self.paused = True
            self.src.transport.pause_reading()

    def resume(self) -> None:
        """dst drained: read again."""
        if self.paused and not self.src.closed:
            self.paused = False
            self.last = self.loop.time()
            self.src.transport.resume_reading()

    def arm(self) -> None:
        wait = self.write_timeout if self.paused else self.read_timeout
        idle = self.loop.time() - self.last
        if idle >= wait:
            self.finish()             # nothing moved for the timeout: stop short
        else:
            self.timer = self.loop.call_later(wait - idle, self.arm)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.resume()


class ServerStream(Stream):
    """An accepted client connection: counted by `accept` when made, then served
    by `handle` in its own task."""

    def __init__(self, accept: Callable[[Stream, tuple[str, int]], Any],
                 handle: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        super().__init__()
        self._accept = accept
        self._handle = handle

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        conn = self._accept(self, (peer[0], peer[1]) if peer else ("", 0))
        self.loop.create_task(self._handle(conn))


class AioTask:
    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    async def join(self, timeout: float | None = None) -> None:
        if timeout is None:
            await self.task
        else:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)


class AioServer:
    def __init__(self, server: asyncio.Server) -> None:
        self.server = server

    async def start(self) -> None:
        await self.server.start_serving()

    def close(self) -> None:
        self.server.close()


def loop_factory(use_uvloop: bool = True
                 ) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """uvloop's loop when wanted and importable, else the standard one; and its name."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


class AioEngine:
    name = "asyncio"

    def __init__(self, use_uvloop: bool = True) -> None:
        factory, self.loop_name = loop_factory(use_uvloop)
        self.runner = asyncio.Runner(loop_factory=factory)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> AioTask:
        return AioTask(asyncio.get_running_loop().create_task(coro))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(delay, fn)

    async def connect(self, host: str, port: int, timeout: float) -> Stream:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, stream = await loop.create_connection(Stream, host, port)
        return stream

    async def listen(self, sock: socket.socket,
                     accept: Callable[[Stream, tuple[str, int]], Any],
                     handle: Callable[[Any], Coroutine[Any, Any, None]]) -> AioServer:
        sock.setblocking(False)
        server = await asyncio.get_running_loop().create_server(
            lambda: ServerStream(accept, handle), sock=sock, backlog=1024,
            start_serving=False)
        return AioServer(server)

    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        asyncio.get_running_loop().add_signal_handler(signum, handler, signum)

    def zmq_context(self) -> zmq.asyncio.Context:
        return zmq.asyncio.Context()

    def plain_context(self, ctx: Any) -> zmq.Context:
        return zmq.Context.shadow(ctx.underlying)

    async def zmq_recv(self, sock: Any) -> tuple[bytes | None, Message]:
        return await recv_async(sock)

    async def zmq_send(self, sock: Any, msg: Message) -> None:
        await send_async(sock, msg)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        self.runner.close()
