"""One balancer worker process, on either engine: server, route subscriber,
access-log pusher and stats publisher.

start() takes the listening socket (inherited from the master, or bound here with
SO_REUSEPORT when run alone) and starts the tasks; run() is the loop that
dispatches queued signals; stop() stops accepting, lets in-flight requests finish
(bounded by shutdown_timeout) and closes everything. Signal handlers only enqueue.

A worker accepts once its first route table has arrived, so it never answers 404
for an app its siblings (or the worker it replaces) know; it then tells the master
it is ready through `ready_fd`. A first start accepts anyway after
startup_routes_wait (answering 503 until routes come); a worker started by a reload
(`wait_routes`) never does: the master abandons the reload instead. It stops when
the master that started it is gone.

The engine (engines.load: asyncio, on uvloop when installed, or eventlet) runs
these coroutines; the start log line says which.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import SimpleNamespace
from typing import Any

from balancer import engines, native
from balancer.engines import Engine, Server, Task
from balancer.exchange import Proxy
from balancer.listener import check_loopback, check_trusted, listening_socket, raise_open_files
from balancer.pool import Pool
from balancer.routes import RouteIndex
from balancer.stats import Stats
from balancer.subscriber import RouteSubscriber
from balancer.telemetry import LOG_FLUSH_INTERVAL, Telemetry
from messaging import channels, curve

log = logging.getLogger(__name__)

PARENT_CHECK = 0.1       # seconds between two looks at signals and at the master


class Balancer:
    def __init__(self, settings: SimpleNamespace, engine: Engine | None = None) -> None:
        self.s = settings
        self.engine = engine or engines.load(settings)
        self.index = RouteIndex()
        self.pool = Pool()
        self.stats = Stats()
        self.telemetry = Telemetry(settings.host_id, settings.stats_interval, self.stats)
        self.proxy = Proxy(settings, self.engine, self.index, self.pool,
                           self.telemetry.access, self.stats)
        self.ctx: Any = None
        self.server: Server | None = None
        self.subscriber: RouteSubscriber | None = None
        self.routes_loaded = False
        self.signals: list[int] = []
        self.stopping = False
        self.accepting = False
        self._ready_fd: int | None = None
        self._parent: int | None = None
        self._tasks: list[Task] = []

    # -- lifecycle (sync entry points) ---------------------------------------------

    def start(self, listen_fd: int | None = None, *, wait_routes: bool = False,
              ready_fd: int | None = None, master_pid: int | None = None) -> None:
        self.engine.run(self._start(listen_fd, wait_routes, ready_fd, master_pid))

    def run(self) -> None:
        """Loop until a stop signal (handlers were installed by start), or until
        the master that started us is gone."""
        try:
            self.engine.run(self._run())
        finally:
            self.engine.close()

    # -- lifecycle, in the engine ------------------------------------------------------

    async def _start(self, listen_fd: int | None, wait_routes: bool,
                     ready_fd: int | None, master_pid: int | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.engine.on_signal(sig, self.signals.append)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)    # the master reloads, not us
        # the master's pid as the master gave it: a master that died before we got
        # here is noticed too (getppid would already name the reaper)
        self._parent = master_pid or (os.getppid() if listen_fd is not None else None)
        check_loopback(self.s.listen_host)
        check_trusted(self.s.trusted_proxies)
        raise_open_files(self.s.max_open_files)
        if listen_fd is None:
            sock = listening_socket(self.s.listen_host, self.s.listen_port)
        else:
            sock = socket.socket(fileno=listen_fd)
        self.s.listen_port = sock.getsockname()[1]
        self.server = await self.engine.listen(sock, self.proxy.accept, self.proxy.handle)
        curve.use_setting(self.s.keys_dir, self.s.key_name or self.s.host_id)
        self.ctx = self.engine.zmq_context()
        # access logs and stats leave with NOBLOCK (dropped when the channel is
        # full): plain sockets on the same context never wait
        plain = self.engine.plain_context(self.ctx)
        self.telemetry.logs = channels.connect(plain, "logs", self.s.logs_endpoint)
        self.telemetry.stats_pub = channels.connect(plain, "stats", self.s.stats_endpoint)
        self._ready_fd = ready_fd
        self.subscriber = RouteSubscriber(
            self.engine, self.ctx, self.s.routes_endpoint,
            self.s.routes_snapshot_endpoint, self.s.host_id, self.on_routes,
            snapshot_timeout=self.s.snapshot_timeout)
        self.subscriber.start()
        self._tasks.append(self.engine.spawn(self._stats_loop()))
        self._tasks.append(self.engine.spawn(self._log_loop()))
        if not wait_routes:
            # a first start: serve once routes are here, or anyway after a while
            # (static stability: a controller that is down must not keep us shut)
            self.engine.call_later(max(0.0, float(self.s.startup_routes_wait)),
                                   self._start_accepting)

    def _start_accepting(self) -> None:
        if self.accepting or self.stopping or self.server is None:
            return
        self.accepting = True
        self._tasks.append(self.engine.spawn(self._serve()))

    async def _serve(self) -> None:
        assert self.server is not None
        await self.server.start()
        log.info("balancer accepting", extra={"address": self.s.listen_host,
                                              "port": self.s.listen_port,
                                              "pid": os.getpid(),
                                              "engine": self.engine.name,
                                              "loop": self.engine.loop_name,
                                              "native": native.active()})
        if self._ready_fd is not None:
            try:
                os.write(self._ready_fd, b"ready\n")
                os.close(self._ready_fd)
            except OSError:
                pass
            self._ready_fd = None

    async def _run(self) -> None:
        while not self.stopping:
            await self.engine.sleep(PARENT_CHECK)
            if self._parent is not None and os.getppid() != self._parent:
                log.error("the balancer master is gone; stopping")
                self._parent = None
                self.signals.append(signal.SIGTERM)
            while self.signals and not self.stopping:
                signum = self.signals.pop(0)
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
            # a connection accepted just before the close is counted within a
            # loop turn or two: let it, then wait for what is in flight
            await self.engine.sleep(0.05)
            while self.proxy.connections and time.monotonic() < deadline:
                self.proxy.drain_idle()
                await self.engine.sleep(0.05)
        if self.proxy.connections:
            log.warning("closing connections still open at shutdown",
                        extra={"connections": len(self.proxy.connections)})
        for conn in list(self.proxy.connections):
            conn.stream.abort()
        if self.subscriber is not None:
            await self.subscriber.stop()
        for task in self._tasks:
            task.cancel()
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
            await self.engine.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            self.telemetry.publish_stats()

    async def _log_loop(self) -> None:
        while True:
            await self.engine.sleep(LOG_FLUSH_INTERVAL)
            self.telemetry.flush()
