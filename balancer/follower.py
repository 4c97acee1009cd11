"""Following the controller's route table, without I/O, for both engines.

Subscribe first, then ask for a snapshot: updates that arrive meanwhile are held by
the messaging.clone.CloneReplica and replayed on top. Whenever the replica sees a
gap (a missing seq, or a tick that differs from it) it wants a snapshot again; ask,
and ask again every `snapshot_timeout` until one arrives. The engines' subscribers
only move messages between their sockets and this object.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from messaging.clone import CloneReplica
from messaging.envelope import Message, make

log = logging.getLogger(__name__)

Table = dict[str, dict[str, Any]]
ASK_EVERY = 0.05    # seconds between checks whether a snapshot is wanted


class RouteFollower:
    """`drop` is a test hook: a callable taking an update's seq that returns True to
    discard it, as if the network had lost it."""

    def __init__(self, host_id: str, on_change: Callable[[Table], None], *,
                 snapshot_timeout: float = 2.0,
                 drop: Callable[[int], bool] | None = None) -> None:
        self.host_id = host_id
        self.on_change = on_change
        self.snapshot_timeout = snapshot_timeout
        self.drop = drop
        self.replica = CloneReplica()
        self.snapshots_asked = 0
        self._asked_at: float | None = None

    def snapshot_request(self, now: float) -> Message | None:
        """The request to send now, if a snapshot is wanted and not just asked for."""
        if not self.replica.needs_snapshot or (
                self._asked_at is not None and now - self._asked_at < self.snapshot_timeout):
            return None
        self._asked_at = now
        self.snapshots_asked += 1
        log.info("asked for a route snapshot",
                 extra={"seq": self.replica.seq, "gaps": self.replica.gaps})
        return make("snapshot_request", self.host_id)

    def on_update(self, msg: Message) -> None:
        """A route_update or route_tick from the PUB channel."""
        if msg.type == "route_update" and self.drop is not None \
                and self.drop(int(msg["seq"])):
            return
        before = self.replica.needs_snapshot
        if self.replica.apply(msg):
            self._changed()
        if self.replica.needs_snapshot and not before:
            log.info("route update gap; asking for a snapshot",
                     extra={"seq": self.replica.seq, "got": msg["seq"]})
            self._asked_at = None

    def on_snapshot(self, msg: Message) -> None:
        if msg.type != "snapshot":
            return
        if not self.replica.needs_snapshot and int(msg["seq"]) <= self.replica.seq:
            return   # an answer to an earlier ask; we are already past it
        self.replica.load(msg)
        self._asked_at = None
        log.info("route snapshot loaded",
                 extra={"seq": self.replica.seq, "apps": len(self.replica.table)})
        self._changed()

    def _changed(self) -> None:
        try:
            self.on_change(self.replica.table)
        except Exception:
            log.exception("route change handler failed")
