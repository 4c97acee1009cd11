"""The balancer daemon on asyncio (engine: asyncio): server, route subscriber and
access-log pusher, with the same start / run / stop as daemon.py so __main__
drives either.

The event loop is uvloop's when it is installed (and the `uvloop` setting allows
it), else the standard one; the start log line says which. start() binds and
starts the tasks; run() waits for queued signals and dispatches them; stop()
stops accepting, lets in-flight requests finish (bounded by shutdown_timeout) and
closes everything. Signal handlers only enqueue.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import zmq
import zmq.asyncio

from balancer.aio_proxy import AioProxy
from balancer.aio_subscriber import AioRouteSubscriber
from balancer.pool import Pool
from balancer.routes import RouteIndex
from config import SettingsError
from messaging import channels
from messaging.envelope import make, send

log = logging.getLogger(__name__)


def check_loopback(host: str) -> None:
    """As daemon.check_loopback (not imported from there: that module imports eventlet)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SettingsError(f"balancer.listen_host {host!r} is not a loopback address",
                            "listen on 127.0.0.1 (or another 127.x address)")


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
        self.proxy = AioProxy(settings, self.index, self.pool, self.push_access_log)
        self.ctx: zmq.asyncio.Context | None = None
        self.server: asyncio.Server | None = None
        self.subscriber: AioRouteSubscriber | None = None
        self.logs: Any = None
        self.signals: asyncio.Queue[int] | None = None
        self.stopping = False
        self.dropped_logs = 0
        factory, self.loop_name = loop_factory(getattr(settings, "uvloop", True))
        self.runner = asyncio.Runner(loop_factory=factory)

    # -- lifecycle (sync entry points, as daemon.Balancer) ---------------------------

    def start(self) -> None:
        self.runner.run(self._start())

    def run(self) -> None:
        """Install signal handlers and loop until a stop signal."""
        try:
            self.runner.run(self._run())
        finally:
            self.runner.close()

    # -- lifecycle, in the loop --------------------------------------------------------

    async def _start(self) -> None:
        check_loopback(self.s.listen_host)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self.proxy.protocol, self.s.listen_host, self.s.listen_port, backlog=1024)
        self.s.listen_port = self.server.sockets[0].getsockname()[1]
        self.ctx = zmq.asyncio.Context()
        # access logs go out with NOBLOCK, dropped when the channel is full: a plain
        # socket on the same context never blocks and keeps envelope.send usable
        self.logs = channels.connect(zmq.Context.shadow(self.ctx.underlying), "logs",
                                     self.s.logs_endpoint)
        self.subscriber = AioRouteSubscriber(
            self.ctx, self.s.routes_endpoint, self.s.routes_snapshot_endpoint,
            self.s.host_id, self.on_routes, snapshot_timeout=self.s.snapshot_timeout)
        self.subscriber.start()
        log.info("balancer listening", extra={"address": self.s.listen_host,
                                              "port": self.s.listen_port,
                                              "engine": "asyncio",
                                              "loop": self.loop_name})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self.signals = asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        while not self.stopping:
            signum = await self.signals.get()
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
            self.server.close()
        if graceful:
            deadline = time.monotonic() + self.s.shutdown_timeout
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
        if self.logs is not None:
            self.logs.close(linger=0)
        if self.ctx is not None:
            self.ctx.term()
        log.info("balancer stopped")

    # -- work ------------------------------------------------------------------------

    def on_routes(self, table: dict[str, dict[str, Any]]) -> None:
        self.index.update(table)
        for conn in self.pool.sync(table):
            conn.close()
        log.info("routes changed", extra={"apps": len(table),
                                          "hosts": len(self.index.hosts)})

    # -- access log: batched (one `log_batch` per LOG_FLUSH_INTERVAL) -----------------

    LOG_FLUSH_INTERVAL = 0.1    # seconds between access-log batches
    LOG_BATCH_MAX = 500         # entries that send a batch at once
    _log_entries: list[dict[str, Any]] | None = None
    _log_task: asyncio.Task[None] | None = None

    def push_access_log(self, app: str, line: str) -> None:
        """Queue one access log line; a task started with the first line sends the
        queue as one `log_batch` every LOG_FLUSH_INTERVAL, or at once when it
        reaches LOG_BATCH_MAX or the balancer is stopping."""
        entries = self._log_entries
        if entries is None:
            entries = self._log_entries = []
            self._log_task = asyncio.get_running_loop().create_task(self._log_loop())
        entries.append({"app": app, "line": line, "proc": "router",
                        "host": self.s.host_id})
        if len(entries) >= self.LOG_BATCH_MAX or self.stopping:
            self.flush_access_log()

    async def _log_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.LOG_FLUSH_INTERVAL)
            self.flush_access_log()
        self.flush_access_log()

    def flush_access_log(self) -> None:
        """Send the queued lines as one message; dropped (and counted) if the
        channel is full, never blocking the proxy."""
        entries = self._log_entries
        if not entries or self.logs is None or self.logs.closed:
            return
        self._log_entries = []
        try:
            send(self.logs, make("log_batch", self.s.host_id, entries=entries),
                 flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_logs += len(entries)
