"""One balancer worker process: accept loop, route subscriber, access-log pusher
and stats publisher, on eventlet.

start() takes the listening socket (inherited from the master, or bound here with
SO_REUSEPORT when run alone) and spawns; run() is the loop that dispatches queued
signals; stop() stops accepting, lets in-flight requests finish (bounded by
shutdown_timeout) and closes everything. Signal handlers only enqueue.

A worker accepts once its first route table has arrived, so it never answers 404
for an app its siblings (or the worker it replaces) know; it then tells the master
it is ready through `ready_fd`. A first start accepts anyway after
startup_routes_wait (answering 503 until routes come); a worker started by a reload
(`wait_routes`) never does: the master abandons the reload instead.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import SimpleNamespace
from typing import Any

import eventlet
import zmq as plain_zmq
from eventlet.green import zmq
from eventlet.greenio import GreenSocket

from balancer.listener import check_loopback, check_trusted, listening_socket, raise_open_files
from balancer.pool import Pool
from balancer.proxy import Proxy
from balancer.routes import RouteIndex
from balancer.stats import Stats
from balancer.subscriber import RouteSubscriber
from balancer.telemetry import LOG_FLUSH_INTERVAL, Telemetry
from messaging import channels

log = logging.getLogger(__name__)


class Balancer:
    def __init__(self, settings: SimpleNamespace) -> None:
        self.s = settings
        self.index = RouteIndex()
        self.pool = Pool()
        self.stats = Stats()
        self.telemetry = Telemetry(settings.host_id, settings.stats_interval, self.stats)
        self.proxy = Proxy(settings, self.index, self.pool, self.telemetry.access,
                           self.stats)
        self.ctx: Any = None
        self.listener: Any = None
        self.subscriber: RouteSubscriber | None = None
        self.routes_loaded = False
        self._wait_routes = False
        self._ready_fd: int | None = None
        self._publisher: Any = None
        self._parent: int | None = None
        self.signals: list[int] = []
        self.stopping = False
        self._acceptor: Any = None
        self._clients = eventlet.GreenPool(100000)
        self._log_flusher: Any = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, listen_fd: int | None = None, *, wait_routes: bool = False,
              ready_fd: int | None = None, master_pid: int | None = None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)    # the master reloads, not us
        # the master's pid as the master gave it: a master that died before we got
        # here is noticed too (getppid would already name the reaper)
        self._parent = master_pid or (os.getppid() if listen_fd is not None else None)
        check_loopback(self.s.listen_host)
        check_trusted(self.s.trusted_proxies)
        raise_open_files(self.s.max_open_files)
        if listen_fd is None:
            raw = listening_socket(self.s.listen_host, self.s.listen_port)
        else:
            raw = socket.socket(fileno=listen_fd)
        self.listener = GreenSocket(raw)
        self.s.listen_port = self.listener.getsockname()[1]
        self.ctx = zmq.Context()
        # access logs leave in batches with NOBLOCK (dropped when the channel is
        # full): a plain pyzmq socket on the same context never blocks, and skips the
        # green wrapper's event checks
        self.telemetry.logs = channels.connect(
            plain_zmq.Context.shadow(self.ctx.underlying), "logs", self.s.logs_endpoint)
        self.telemetry.stats_pub = channels.connect(self.ctx, "stats", self.s.stats_endpoint)
        self._wait_routes, self._ready_fd = wait_routes, ready_fd
        self.subscriber = RouteSubscriber(
            self.ctx, self.s.routes_endpoint, self.s.routes_snapshot_endpoint,
            self.s.host_id, self.on_routes, snapshot_timeout=self.s.snapshot_timeout)
        self.subscriber.start()
        self._publisher = eventlet.spawn(self._stats_loop)
        self._log_flusher = eventlet.spawn(self._log_loop)
        if not wait_routes:
            # a first start: serve once routes are here, or anyway after a while
            # (static stability: a controller that is down must not keep us shut)
            eventlet.spawn_after(max(0.0, float(self.s.startup_routes_wait)),
                                 self._start_accepting)

    def _start_accepting(self) -> None:
        if self._acceptor is not None or self.stopping:
            return
        self._acceptor = eventlet.spawn(self._accept_loop)
        log.info("balancer accepting", extra={"address": self.s.listen_host,
                                              "port": self.s.listen_port,
                                              "pid": os.getpid()})
        if self._ready_fd is not None:
            try:
                os.write(self._ready_fd, b"ready\n")
                os.close(self._ready_fd)
            except OSError:
                pass
            self._ready_fd = None

    def run(self) -> None:
        """Loop until a stop signal (handlers were installed by start), or until
        the master that started us is gone."""
        while not self.stopping:
            eventlet.sleep(0.1)
            if self._parent is not None and os.getppid() != self._parent:
                log.error("the balancer master is gone; stopping")
                self.signals.append(signal.SIGTERM)
                self._parent = None
            while self.signals:
                signum = self.signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.handle_term()

    def handle_term(self) -> None:
        log.info("stop signal: finishing in-flight requests",
                 extra={"connections": len(self.proxy.connections)})
        self.stop(graceful=True)

    def stop(self, graceful: bool = True) -> None:
        self.stopping = True
        self.proxy.draining = True
        if self._acceptor is not None:
            self._acceptor.kill()
        if self.listener is not None:
            # our copy only: the master keeps the socket (and its accept queue)
            # open for the workers that replace us
            self.listener.close()
        if graceful:
            deadline = time.monotonic() + self.s.shutdown_timeout
            while self.proxy.connections and time.monotonic() < deadline:
                self.proxy.drain_idle()
                eventlet.sleep(0.05)
        if self.proxy.connections:
            log.warning("closing connections still open at shutdown",
                        extra={"connections": len(self.proxy.connections)})
        for conn in list(self.proxy.connections):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.subscriber is not None:
            self.subscriber.stop()
        if self._publisher is not None:
            self._publisher.kill()
        if self._log_flusher is not None:
            self._log_flusher.kill()
        self.telemetry.close()         # the last partial interval and log lines
        if self.ctx is not None:
            self.ctx.term()
        log.info("balancer stopped")

    # -- work ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError as exc:
                log.warning("accept failed", extra={"error": str(exc)})
                eventlet.sleep(0.05)
                continue
            self._clients.spawn_n(self.proxy.handle, sock, addr)

    def on_routes(self, table: dict[str, dict[str, Any]]) -> None:
        self.index.update(table)
        if not self.routes_loaded:
            self.routes_loaded = True
            self._start_accepting()
        for conn in self.pool.sync(self.index.routes):
            try:
                conn.close()
            except OSError:
                pass
        log.info("routes changed", extra={"apps": len(table),
                                          "hosts": len(self.index.hosts)})

    def _stats_loop(self) -> None:
        interval = max(0.05, float(self.s.stats_interval))
        next_at = time.monotonic() + interval
        while True:
            eventlet.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            self.telemetry.publish_stats()

    def _log_loop(self) -> None:
        while True:
            eventlet.sleep(LOG_FLUSH_INTERVAL)
            self.telemetry.flush()

