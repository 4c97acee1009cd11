"""One balancer worker process on asyncio (engine: asyncio): server, route
subscriber, access-log pusher and stats publisher, with the same start / run /
stop as daemon.py (the eventlet worker), so the master and __main__ drive either.

start() takes the listening socket (inherited from the master, or bound here with
SO_REUSEPORT when run alone) and starts the tasks; run() waits for queued signals
and dispatches them; stop() stops accepting, lets in-flight requests finish
(bounded by shutdown_timeout) and closes everything. Signal handlers only enqueue.

As daemon.py: the worker accepts once its first route table has arrived and then
says so on `ready_fd`; a first start accepts anyway after startup_routes_wait
(answering 503 until routes come), a worker started by a reload (`wait_routes`)
never does. It stops when the master that started it is gone.

The event loop is uvloop's when it is installed (and the `uvloop` setting allows
it), else the standard one; the start log line says which.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import zmq
import zmq.asyncio

from balancer.aio_proxy import AioProxy
from balancer.aio_subscriber import AioRouteSubscriber
from balancer.listener import check_loopback, check_trusted, listening_socket, raise_open_files
from balancer.pool import Pool
from balancer.routes import RouteIndex
from balancer.stats import Stats
from balancer.telemetry import LOG_FLUSH_INTERVAL, Telemetry
from messaging import channels

log = logging.getLogger(__name__)

PARENT_CHECK = 0.1       # seconds between two looks at whether the master is alive


def loop_factory(use_uvloop: bool = True) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """uvloop's loop when wanted and importable, else the standard one; and its name."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


class Balancer:
    def __init__(self, settings: SimpleNamespace) -> None:
        self.s = settings
        self.index = RouteIndex()
        self.pool = Pool()
        self.stats = Stats()
        self.telemetry = Telemetry(settings.host_id, settings.stats_interval, self.stats)
        self.proxy = AioProxy(settings, self.index, self.pool, self.telemetry.access,
                              self.stats)
        self.ctx: zmq.asyncio.Context | None = None
        self.server: asyncio.Server | None = None
        self.subscriber: AioRouteSubscriber | None = None
        self.routes_loaded = False
        self.signals: asyncio.Queue[int] | None = None
        self.stopping = False
        self.accepting = False
        self._ready_fd: int | None = None
        self._parent: int | None = None
        self._master_pid: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        factory, self.loop_name = loop_factory(settings.uvloop)
        self.runner = asyncio.Runner(loop_factory=factory)

    # -- lifecycle (sync entry points, as daemon.Balancer) ---------------------------

    def start(self, listen_fd: int | None = None, *, wait_routes: bool = False,
              ready_fd: int | None = None, master_pid: int | None = None) -> None:
        self._master_pid = master_pid
        self.runner.run(self._start(listen_fd, wait_routes, ready_fd))

    def run(self) -> None:
        """Loop until a stop signal (handlers were installed by start), or until
        the master that started us is gone."""
        try:
            self.runner.run(self._run())
        finally:
            self.runner.close()

    # -- lifecycle, in the loop --------------------------------------------------------

    async def _start(self, listen_fd: int | None, wait_routes: bool,
                     ready_fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.signals = asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)    # the master reloads, not us
        # the master's pid as the master gave it: a master that died before we got
        # here is noticed too (getppid would already name the reaper)
        self._parent = self._master_pid or (os.getppid() if listen_fd is not None else None)
        check_loopback(self.s.listen_host)
        check_trusted(self.s.trusted_proxies)
        raise_open_files(self.s.max_open_files)
        if listen_fd is None:
            sock = listening_socket(self.s.listen_host, self.s.listen_port)
        else:
            sock = socket.socket(fileno=listen_fd)
        sock.setblocking(False)
        self.server = await loop.create_server(self.proxy.protocol, sock=sock,
                                               backlog=1024, start_serving=False)
        self.s.listen_port = sock.getsockname()[1]
        self.ctx = zmq.asyncio.Context()
        # access logs and stats go out with NOBLOCK, dropped when the channel is
        # full: plain sockets on the same context never block and keep
        # envelope.send usable
        plain = zmq.Context.shadow(self.ctx.underlying)
        self.telemetry.logs = channels.connect(plain, "logs", self.s.logs_endpoint)
        self.telemetry.stats_pub = channels.connect(plain, "stats", self.s.stats_endpoint)
        self._ready_fd = ready_fd
        self.subscriber = AioRouteSubscriber(
            self.ctx, self.s.routes_endpoint, self.s.routes_snapshot_endpoint,
            self.s.host_id, self.on_routes, snapshot_timeout=self.s.snapshot_timeout)
        self.subscriber.start()
        self._tasks.append(loop.create_task(self._stats_loop()))
        self._tasks.append(loop.create_task(self._log_loop()))
        if not wait_routes:
            # a first start: serve once routes are here, or anyway after a while
            # (static stability: a controller that is down must not keep us shut)
            loop.call_later(max(0.0, float(self.s.startup_routes_wait)),
                            self._start_accepting)

    def _start_accepting(self) -> None:
        if self.accepting or self.stopping or self.server is None:
            return
        self.accepting = True
        self._tasks.append(asyncio.get_running_loop().create_task(self._serve()))

    async def _serve(self) -> None:
        assert self.server is not None
        await self.server.start_serving()
        log.info("balancer accepting", extra={"address": self.s.listen_host,
                                              "port": self.s.listen_port,
                                              "pid": os.getpid(), "engine": "asyncio",
                                              "loop": self.loop_name})
        if self._ready_fd is not None:
            try:
                os.write(self._ready_fd, b"ready\n")
                os.close(self._ready_fd)
            except OSError:
                pass
            self._ready_fd = None

    async def _run(self) -> None:
        assert self.signals is not None
        while not self.stopping:
            try:
                signum = await asyncio.wait_for(self.signals.get(), PARENT_CHECK)
            except TimeoutError:
                if self._parent is not None and os.getppid() != self._parent:
                    log.error("the balancer master is gone; stopping")
                    self._parent = None
                    self.signals.put_nowait(signal.SIGTERM)
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                await self.handle_term()

    async def handle_term(self) -> None:
        log.info("stop signal: finishing in-flight requests",
                 extra={"connections": len(self.proxy.connections)})
        await self.stop(graceful=True)

    async def stop(self, graceful: bool = True) -> None:
        self.stopping = True
        self.proxy.draining = True
        if self.server is not None:
            # our copy only: the master keeps the socket (and its accept queue)
            # open for the workers that replace us
            self.server.close()
        if graceful:
            deadline = time.monotonic() + self.s.shutdown_timeout
            # a connection accepted just before the close gets its protocol (and
            # its first bytes) within a loop turn or two: let it, then count it
            await asyncio.sleep(0.05)
            while self.proxy.connections and time.monotonic() < deadline:
                self.proxy.drain_idle()
                await asyncio.sleep(0.05)
        if self.proxy.connections:
            log.warning("closing connections still open at shutdown",
                        extra={"connections": len(self.proxy.connections)})
        for conn in list(self.proxy.connections):
            conn.abort()
        if self.subscriber is not None:
            await self.subscriber.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.telemetry.close()     # the last partial interval and log lines
        if self.ctx is not None:
            self.ctx.term()
        log.info("balancer stopped")

    # -- work ------------------------------------------------------------------------

    def on_routes(self, table: dict[str, dict[str, Any]]) -> None:
        self.index.update(table)
        if not self.routes_loaded:
            self.routes_loaded = True
            self._start_accepting()
        for conn in self.pool.sync(self.index.routes):
            conn.close()
        log.info("routes changed", extra={"apps": len(table),
                                          "hosts": len(self.index.hosts)})

    async def _stats_loop(self) -> None:
        interval = max(0.05, float(self.s.stats_interval))
        next_at = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            self.telemetry.publish_stats()

    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL)
            self.telemetry.flush()
