"""Route replication on either engine: two ZeroMQ sockets feeding a
balancer.follower.RouteFollower (which holds every decision). Three tasks share
it, which is safe because tasks only switch at an await (or green I/O)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from balancer.engines import Engine, Task
from balancer.follower import ASK_EVERY, RouteFollower, Table
from messaging import channels
from messaging.clone import CloneReplica
from messaging.envelope import Message
from messaging.errors import ProtocolError

log = logging.getLogger(__name__)


class RouteSubscriber:
    def __init__(self, engine: Engine, ctx: Any, routes_endpoint: str,
                 snapshot_endpoint: str, host_id: str,
                 on_change: Callable[[Table], None], *, snapshot_timeout: float = 2.0,
                 drop: Callable[[int], bool] | None = None) -> None:
        self.engine = engine
        self.ctx = ctx          # the engine's zmq context (engine.zmq_context())
        self.routes_endpoint = routes_endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.follower = RouteFollower(host_id, on_change, snapshot_timeout=snapshot_timeout,
                                      drop=drop)
        self._tasks: list[Task] = []
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
        """Connect and start the tasks (on asyncio: from inside the running loop)."""
        self._sub = channels.connect(self.ctx, "routes", self.routes_endpoint)
        self._dealer = channels.connect(self.ctx, "routes_snapshot",
                                        self.snapshot_endpoint)
        spawn = self.engine.spawn
        self._tasks = [spawn(self._read(self._sub, self.follower.on_update)),
                       spawn(self._read(self._dealer, self.follower.on_snapshot)),
                       spawn(self._ask_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task.join()
            except BaseException:   # noqa: BLE001 - the cancellation itself
                pass
        self._tasks = []
        for sock in (self._sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._dealer = None

    async def _ask_loop(self) -> None:
        while True:
            ask = self.follower.snapshot_request(time.monotonic())
            if ask is not None:
                await self.engine.zmq_send(self._dealer, ask)
            await self.engine.sleep(ASK_EVERY)

    async def _read(self, sock: Any, handle: Callable[[Message], None]) -> None:
        while True:
            try:
                _, msg = await self.engine.zmq_recv(sock)
            except ProtocolError as exc:
                log.warning("bad route message", extra={"error": exc.message})
                continue
            handle(msg)
