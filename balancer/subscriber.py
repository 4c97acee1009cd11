"""Route replication for the eventlet engine: green sockets feeding a
balancer.follower.RouteFollower. Three green threads share it, which is safe because
green threads only switch at I/O."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import eventlet
from eventlet.green import zmq

from balancer.follower import ASK_EVERY, RouteFollower, Table
from messaging import channels
from messaging.clone import CloneReplica
from messaging.envelope import Message, recv, send
from messaging.errors import ProtocolError

log = logging.getLogger(__name__)


class RouteSubscriber:
    def __init__(self, ctx: zmq.Context, routes_endpoint: str, snapshot_endpoint: str,
                 host_id: str, on_change: Callable[[Table], None], *,
                 snapshot_timeout: float = 2.0,
                 drop: Callable[[int], bool] | None = None) -> None:
        self.ctx = ctx
        self.routes_endpoint = routes_endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.follower = RouteFollower(host_id, on_change, snapshot_timeout=snapshot_timeout,
                                      drop=drop)
        self._threads: list[Any] = []
        self._sub: Any = None
        self._dealer: Any = None

    @property
    def replica(self) -> CloneReplica:
        return self.follower.replica

    @property
    def snapshots_asked(self) -> int:
        return self.follower.snapshots_asked

    @property
    def table(self) -> Table:
        return self.follower.replica.table

    def start(self) -> None:
        self._sub = channels.connect(self.ctx, "routes", self.routes_endpoint)
        self._dealer = channels.connect(self.ctx, "routes_snapshot",
                                        self.snapshot_endpoint)
        self._threads = [eventlet.spawn(self._read, self._sub, self.follower.on_update),
                         eventlet.spawn(self._read, self._dealer, self.follower.on_snapshot),
                         eventlet.spawn(self._ask_loop)]

    def stop(self) -> None:
        for thread in self._threads:
            thread.kill()
        self._threads = []
        for sock in (self._sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._dealer = None

    def _ask_loop(self) -> None:
        while True:
            ask = self.follower.snapshot_request(time.monotonic())
            if ask is not None:
                send(self._dealer, ask)
            eventlet.sleep(ASK_EVERY)

    def _read(self, sock: Any, handle: Callable[[Message], None]) -> None:
        while True:
            try:
                _, msg = recv(sock)
            except ProtocolError as exc:
                log.warning("bad route message", extra={"error": exc.message})
                continue
            handle(msg)
