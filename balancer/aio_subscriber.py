"""Route replication for the asyncio engine: the same messaging.clone.CloneReplica
bookkeeping as subscriber.py, over zmq.asyncio sockets.

Subscribe first, then ask for a snapshot: updates that arrive meanwhile are held by
the replica and replayed on top. Whenever the replica sees a gap (a missing seq, or
a tick ahead of it) it wants a snapshot again; we ask, and ask again every
snapshot_timeout until one arrives. Three tasks share one replica, which is safe
because tasks only switch at an await.

messaging.envelope.recv/send call the socket synchronously, which a zmq.asyncio
socket answers with a Future; so frames go through envelope.encode/decode here,
with the awaiting done by this module.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from messaging import channels
from messaging.clone import CloneReplica
from messaging.envelope import Message, decode, encode, make
from messaging.errors import ProtocolError

log = logging.getLogger(__name__)

Table = dict[str, dict[str, Any]]


async def recv(sock: zmq.asyncio.Socket) -> tuple[bytes | None, Message]:
    """envelope.recv for a zmq.asyncio socket: (identity or None, message)."""
    frames = await sock.recv_multipart()
    identity = None
    if sock.type == zmq.ROUTER:
        identity, frames = frames[0], frames[1:]
    return identity, decode(frames)


async def send(sock: zmq.asyncio.Socket, msg: Message) -> None:
    """envelope.send for a zmq.asyncio socket (connecting ends: no identity)."""
    await sock.send_multipart(encode(msg))


class AioRouteSubscriber:
    """`drop` is a test hook: a callable taking an update's seq that returns True to
    discard it, as if the network had lost it."""

    def __init__(self, ctx: zmq.asyncio.Context, routes_endpoint: str,
                 snapshot_endpoint: str, host_id: str,
                 on_change: Callable[[Table], None], *, snapshot_timeout: float = 2.0,
                 drop: Callable[[int], bool] | None = None) -> None:
        self.ctx = ctx
        self.routes_endpoint = routes_endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.host_id = host_id
        self.on_change = on_change
        self.snapshot_timeout = snapshot_timeout
        self.drop = drop
        self.replica = CloneReplica()
        self.snapshots_asked = 0
        self._asked_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self._dealer: Any = None

    @property
    def table(self) -> Table:
        return self.replica.table

    def start(self) -> None:
        """Connect and start the tasks (call from inside the running loop)."""
        self._sub = channels.connect(self.ctx, "routes", self.routes_endpoint)
        self._dealer = channels.connect(self.ctx, "routes_snapshot",
                                        self.snapshot_endpoint)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_updates()),
                       loop.create_task(self._read_snapshots()),
                       loop.create_task(self._ask_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sock in (self._sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)
        self._sub = self._dealer = None

    # -- tasks -------------------------------------------------------------------------

    async def _ask_loop(self) -> None:
        while True:
            now = time.monotonic()
            if self.replica.needs_snapshot and (
                    self._asked_at is None or now - self._asked_at >= self.snapshot_timeout):
                await send(self._dealer, make("snapshot_request", self.host_id))
                self._asked_at = now
                self.snapshots_asked += 1
                log.info("asked for a route snapshot",
                         extra={"seq": self.replica.seq, "gaps": self.replica.gaps})
            await asyncio.sleep(0.05)

    async def _read_updates(self) -> None:
        while True:
            msg = await self._recv(self._sub)
            if msg is None:
                continue
            if msg.type == "route_update" and self.drop is not None \
                    and self.drop(int(msg["seq"])):
                continue
            before = self.replica.needs_snapshot
            if self.replica.apply(msg):
                self._changed()
            if self.replica.needs_snapshot and not before:
                log.info("route update gap; asking for a snapshot",
                         extra={"seq": self.replica.seq, "got": msg["seq"]})
                self._asked_at = None

    async def _read_snapshots(self) -> None:
        while True:
            msg = await self._recv(self._dealer)
            if msg is None or msg.type != "snapshot":
                continue
            if not self.replica.needs_snapshot and int(msg["seq"]) <= self.replica.seq:
                continue   # an answer to an earlier ask; we are already past it
            self.replica.load(msg)
            self._asked_at = None
            log.info("route snapshot loaded",
                     extra={"seq": self.replica.seq, "apps": len(self.replica.table)})
            self._changed()

    async def _recv(self, sock: Any) -> Message | None:
        try:
            _, msg = await recv(sock)
        except ProtocolError as exc:
            log.warning("bad route message", extra={"error": exc.message})
            return None
        return msg

    def _changed(self) -> None:
        try:
            self.on_change(self.replica.table)
        except Exception:
            log.exception("route change handler failed")
