"""One TCP connection as awaitable reads and writes, for the asyncio engine.

A small asyncio.Protocol instead of asyncio streams: reads hand back whatever
arrived (like a socket recv), a read that finds data buffered returns without
suspending, and a timeout costs one timer handle instead of a wait_for task
wrapper. Flow control both ways: reading pauses past READ_HIGH buffered bytes,
and a write waits when the transport says its buffer is full.
"""
from __future__ import annotations

import asyncio
from typing import Any

READ_HIGH = 1 << 18      # buffered bytes past which the transport stops reading


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Stream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False          # the peer sent FIN (or the connection is gone)
        self.closed = False       # connection_lost happened
        self.read_paused = False
        self.write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    # -- protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
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
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True     # keep the write side open: a half-closed client still gets its answer

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = self.eof = True
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
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- awaitable I/O ----------------------------------------------------------------

    async def recv(self, timeout: float) -> bytes:
        """Everything buffered, waiting up to `timeout` seconds for something;
        b"" at end of stream; TimeoutError past the timeout."""
        if not self.chunks:
            if self.eof:
                return b""
            fut = asyncio.get_running_loop().create_future()
            self._waiter = fut
            handle = fut.get_loop().call_later(max(timeout, 0.001), _expire, fut)
            try:
                await fut
            finally:
                handle.cancel()
                if self._waiter is fut:
                    self._waiter = None
            if not self.chunks:
                return b""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        """Queue bytes; ConnectionResetError when the connection is gone. Callers
        that may write a lot await drain() after it."""
        if self.closed or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        if not self.write_paused:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drain = fut
        handle = fut.get_loop().call_later(max(timeout, 0.001), _expire, fut)
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

    def reusable(self) -> bool:
        """An idle pooled connection is usable if it has neither closed nor sent
        anything unasked."""
        return not (self.eof or self.chunks or self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes too (like shutdown(SHUT_RDWR))."""
        if self.transport is not None:
            self.transport.abort()
