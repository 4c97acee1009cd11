"""What an I/O engine gives the balancer's shared code (exchange.py, daemon.py,
subscriber.py), and the choice between the two engines.

The shared code is coroutines. It awaits only the operations below, so one body
of code runs on either engine: on asyncio (aio.py) they suspend as usual; on
eventlet (green.py) they block the green thread and never suspend, and
green.drive runs a coroutine to its end in one call. An engine's own module holds
only what is specific to it: socket calls, timers, tasks, its event loop.
"""
from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any, Protocol


class Stream(Protocol):
    """One TCP connection."""

    async def recv(self, timeout: float) -> bytes:
        """What has arrived (waiting up to `timeout` seconds for something); b"" at
        end of stream; TimeoutError past the timeout, OSError when reset."""

    async def send(self, data: bytes, timeout: float) -> None:
        """All of `data`, each wait for the peer bounded by `timeout`; OSError
        (TimeoutError included) when it cannot."""

    async def pipe(self, dst: Any, n: int, read_timeout: float,
                   write_timeout: float) -> tuple[int, bool]:
        """Move the next `n` bytes into `dst`: (bytes moved, clean). Fewer than `n`
        when this stream ended, `dst` failed or nothing moved for the timeout
        (read_timeout for bytes to come, write_timeout for `dst` to take them);
        clean is false when bytes past the `n` came too (never raises)."""

    def reusable(self, probe: bool = True) -> bool:
        """An idle connection is still usable: not closed, nothing sent unasked.
        `probe` false: the engine may answer yes rather than spend a syscall."""

    def has_bytes(self) -> bool:
        """Bytes wait unread (a request is arriving)."""

    def finish(self) -> None:
        """End the connection after what is queued; wakes a reader of it."""

    def abort(self) -> None:
        """Drop the connection now; wakes a reader of it."""

    def close(self) -> None:
        """Release it (never raises)."""


class Task(Protocol):
    def cancel(self) -> None:
        """Stop it if it still runs (at its next wait)."""

    async def join(self, timeout: float | None = None) -> None:
        """Until it has finished; TimeoutError past `timeout`."""


class Server(Protocol):
    async def start(self) -> None:
        """Begin accepting."""

    def close(self) -> None:
        """Stop accepting (our copy of the listening socket only)."""


class Engine(Protocol):
    name: str
    loop_name: str

    def spawn(self, coro: Coroutine[Any, Any, None]) -> Task: ...
    async def sleep(self, seconds: float) -> None: ...
    def call_later(self, delay: float, fn: Callable[[], None]) -> None: ...
    async def connect(self, host: str, port: int, timeout: float) -> Stream: ...
    async def listen(self, sock: Any, accept: Callable[[Stream, tuple[str, int]], Any],
                     handle: Callable[[Any], Coroutine[Any, Any, None]]) -> Server:
        """A server on the listening `sock`: each connection is given to
        `accept(stream, addr)` at once, and what it returns to `handle` in a task."""
    def on_signal(self, signum: int, handler: Callable[[int], None]) -> None: ...
    def zmq_context(self) -> Any: ...
    def plain_context(self, ctx: Any) -> Any:
        """A plain pyzmq context on the same ZeroMQ context: its sockets never
        wait, for sends with NOBLOCK."""
    async def zmq_recv(self, sock: Any) -> Any: ...
    async def zmq_send(self, sock: Any, msg: Any) -> None: ...
    def run(self, coro: Coroutine[Any, Any, Any]) -> Any: ...
    def close(self) -> None: ...


def load(settings: SimpleNamespace) -> Engine:
    """The engine the settings name (importing eventlet only for that one)."""
    if settings.engine == "eventlet":
        from balancer.green import GreenEngine
        return GreenEngine()
    from balancer.aio import AioEngine
    return AioEngine(use_uvloop=settings.uvloop)
