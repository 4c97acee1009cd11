"""The balancer daemon: accept loop, route subscriber and access-log pusher.

start() binds and spawns; run() is the loop that dispatches queued signals;
stop() stops accepting, lets in-flight requests finish (bounded by
shutdown_timeout) and closes everything. Signal handlers only enqueue.
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import time
from types import SimpleNamespace
from typing import Any

import eventlet
from eventlet.green import zmq

from balancer.proxy import Proxy
from balancer.pool import Pool
from balancer.routes import RouteIndex
from balancer.subscriber import RouteSubscriber
from config import SettingsError
from messaging import channels
from messaging.envelope import make, send

log = logging.getLogger(__name__)


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SettingsError(f"balancer.listen_host {host!r} is not a loopback address",
                            "listen on 127.0.0.1 (or another 127.x address)")


class Balancer:
    def __init__(self, settings: SimpleNamespace) -> None:
        self.s = settings
        self.index = RouteIndex()
        self.pool = Pool()
        self.proxy = Proxy(settings, self.index, self.pool, self.push_access_log)
        self.ctx: Any = None
        self.listener: Any = None
        self.subscriber: RouteSubscriber | None = None
        self.logs: Any = None
        self.signals: list[int] = []
        self.stopping = False
        self._acceptor: Any = None
        self._clients = eventlet.GreenPool(100000)
        self.dropped_logs = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        check_loopback(self.s.listen_host)
        family = socket.AF_INET6 if ":" in self.s.listen_host else socket.AF_INET
        self.listener = eventlet.listen((self.s.listen_host, self.s.listen_port),
                                        family=family, backlog=1024)
        self.s.listen_port = self.listener.getsockname()[1]
        self.ctx = zmq.Context()
        self.logs = channels.connect(self.ctx, "logs", self.s.logs_endpoint)
        self.subscriber = RouteSubscriber(
            self.ctx, self.s.routes_endpoint, self.s.routes_snapshot_endpoint,
            self.s.host_id, self.on_routes, snapshot_timeout=self.s.snapshot_timeout)
        self.subscriber.start()
        self._acceptor = eventlet.spawn(self._accept_loop)
        log.info("balancer listening", extra={"address": self.s.listen_host,
                                              "port": self.s.listen_port})

    def run(self) -> None:
        """Install signal handlers and loop until a stop signal."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        while not self.stopping:
            eventlet.sleep(0.1)
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
        if self.logs is not None:
            self.logs.close(linger=0)
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
        for conn in self.pool.sync(table):
            try:
                conn.close()
            except OSError:
                pass
        log.info("routes changed", extra={"apps": len(table),
                                          "hosts": len(self.index.hosts)})

    def push_access_log(self, app: str, line: str) -> None:
        """One access log line to the logs channel; dropped if the channel is full."""
        if self.logs is None:
            return
        try:
            send(self.logs, make("log", self.s.host_id, app=app, line=line,
                                 proc="router", host=self.s.host_id), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_logs += 1
        log.debug("access", extra={"app": app, "line": line})
