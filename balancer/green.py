"""The eventlet engine (engine: eventlet): green sockets, green threads and the
hub's timers under the balancer's shared coroutines (see engines.py).

Every awaitable here blocks its green thread instead of suspending, so a shared
coroutine never yields to its caller and drive() runs it to its end in one call.
Timeouts are the green sockets' own (settimeout): eventlet first tries the
syscall and arms a hub timer only when it has to wait, so bytes that are already
there cost no timer. The timeout is read when a wait starts, so two green threads
that share a socket (the body pump and the response reader) each get their own.
"""
from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import eventlet
import zmq as plain_zmq
from eventlet.green import socket as gsocket
from eventlet.green import zmq as gzmq
from eventlet.greenio import GreenSocket

from messaging.envelope import Message, recv, send

log = logging.getLogger(__name__)

BUFSIZE = 65536
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a shared coroutine to its end in this green thread; its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a coroutine suspended under the eventlet engine")


class GreenStream:
    __slots__ = ("sock",)

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    async def recv(self, timeout: float) -> bytes:
        sock = self.sock
        sock.settimeout(timeout if timeout > 0.001 else 0.001)
        return sock.recv(BUFSIZE)

    async def send(self, data: bytes, timeout: float) -> None:
        sock = self.sock
        sock.settimeout(timeout if timeout > 0.001 else 0.001)
        sock.sendall(data)

    async def pipe(self, dst: GreenStream, n: int, read_timeout: float,
                   write_timeout: float) -> tuple[int, bool]:
        """Move the next `n` bytes into `dst` (reads never ask for more than `n`);
        (bytes moved, clean) as aio.Stream.pipe."""
        moved = 0
        try:
            while moved < n:
                data = await self.recv_at_most(n - moved, read_timeout)
                if not data:
                    break
                await dst.send(data, write_timeout)
                moved += len(data)
        except OSError:
            pass
        return moved, not self.has_bytes()

    async def recv_at_most(self, size: int, timeout: float) -> bytes:
        sock = self.sock
        sock.settimeout(timeout if timeout > 0.001 else 0.001)
        return sock.recv(min(size, BUFSIZE))

    def reusable(self, probe: bool = True) -> bool:
        if not probe:
            return True
        try:
            self.sock.fd.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False   # closed (b"") or unexpected bytes: either way not reusable

    def has_bytes(self) -> bool:
        try:
            return bool(self.sock.fd.recv(1, _PEEK))
        except OSError:
            return False

    def finish(self) -> None:
        self.abort()   # sent bytes are in the kernel already; shutdown wakes readers

    def abort(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class GreenTask:
    __slots__ = ("thread",)

    def __init__(self, thread: Any) -> None:
        self.thread = thread

    def cancel(self) -> None:
        if not self.thread.dead:
            self.thread.kill()

    async def join(self, timeout: float | None = None) -> None:
        if timeout is None:
            self.thread.wait()
            return
        with eventlet.Timeout(timeout, TimeoutError):
            self.thread.wait()


class GreenServer:
    def __init__(self, listener: Any, accept: Callable[[GreenStream, tuple[str, int]], Any],
                 handle: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        self.listener = listener
        self.accept = accept
        self.handle = handle
        self.clients = eventlet.GreenPool(100000)
        self.acceptor: Any = None

    async def start(self) -> None:
        self.acceptor = eventlet.spawn(self._accept_loop)

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.kill()
        self.listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.warning("accept failed", extra={"error": str(exc)})
                eventlet.sleep(0.05)      # out of files, most likely: let some close
                continue
            conn = self.accept(GreenStream(sock), addr)
            self.clients.spawn_n(self._run, conn)

    def _run(self, conn: Any) -> None:
        drive(self.handle(conn))


class GreenEngine:
    name = "eventlet"
    loop_name = "eventlet"

    def spawn(self, coro: Coroutine[Any, Any, None]) -> GreenTask:
        return GreenTask(eventlet.spawn(drive, coro))

    async def sleep(self, seconds: float) -> None:
        eventlet.sleep(seconds)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        eventlet.spawn_after(delay, fn)

    async def connect(self, host: str, port: int, timeout: float) -> GreenStream:
        sock = gsocket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return GreenStream(sock)

    async def listen(self, sock: socket.socket,
                     accept: Callable[[GreenStream, tuple[str, int]], Any],
                     handle: Callable[[Any], Coroutine[Any, Any, None]]) -> GreenServer:
        return GreenServer(GreenSocket(sock), accept, handle)

    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        signal.signal(signum, lambda sig, frame: handler(sig))

    def zmq_context(self) -> Any:
        return gzmq.Context()

    def plain_context(self, ctx: Any) -> Any:
        """A pyzmq context on the same ZeroMQ context, for sends that never block."""
        return plain_zmq.Context.shadow(ctx.underlying)

    async def zmq_recv(self, sock: Any) -> tuple[bytes | None, Message]:
        return recv(sock)

    async def zmq_send(self, sock: Any, msg: Message) -> None:
        send(sock, msg)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return drive(coro)

    def close(self) -> None:
        pass
