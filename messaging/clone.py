"""Route replication as a snapshot plus numbered updates (the zguide "clone" pattern).

Messages get lost, so a replica never trusts the stream alone: every update has a
sequence number, a tick repeats the latest number every second, and a replica that
sees a gap asks for a fresh snapshot. Pure bookkeeping; the sockets live in the
publisher and subscriber components.
"""
from __future__ import annotations

import copy
from typing import Any

from messaging.envelope import Message, make


class ClonePublisher:
    """The authoritative table. Each change yields the message to publish."""

    def __init__(self, sender: str = "controller") -> None:
        self.sender = sender
        self.seq = 0
        self.table: dict[str, dict[str, Any]] = {}

    def set(self, key: str, value: dict[str, Any] | None) -> Message | None:
        """Change one entry; returns the update to publish, or None if unchanged."""
        if self.table.get(key) == value:
            return None
        if value is None:
            del self.table[key]
        else:
            self.table[key] = copy.deepcopy(value)
        self.seq += 1
        return make("route_update", self.sender, seq=self.seq, app=key, route=value)

    def snapshot(self) -> Message:
        return make("snapshot", self.sender, seq=self.seq, routes=copy.deepcopy(self.table))

    def tick(self) -> Message:
        return make("route_tick", self.sender, seq=self.seq)


class CloneReplica:
    """A copy of the table that notices when it has fallen behind.

    States: `synced` False until the first snapshot; `needs_snapshot` is raised by a
    gap and lowered by the next snapshot. Updates that arrive before the snapshot are
    held and replayed on top of it.
    """

    def __init__(self) -> None:
        self.seq = -1
        self.table: dict[str, dict[str, Any]] = {}
        self.synced = False
        self.needs_snapshot = True
        self._held: list[Message] = []
        self.gaps = 0

    def apply(self, msg: Message) -> bool:
        """Apply an update or tick; returns True when the table changed."""
        if not self.synced:
            if msg.type == "route_update":
                self._held.append(msg)
            return False
        seq = int(msg["seq"])
        if msg.type == "route_tick":
            if seq != self.seq:     # ahead: we missed updates; behind: publisher restarted
                self._gap()
            return False
        if seq <= self.seq:
            return False
        if seq != self.seq + 1:
            self._gap()
            return False
        self.seq = seq
        self._set(msg["app"], msg.get("route"))
        return True

    def load(self, snap: Message) -> None:
        """Replace the table with a snapshot, then replay held updates past it."""
        self.table = copy.deepcopy(snap["routes"])
        self.seq = int(snap["seq"])
        self.synced = True
        self.needs_snapshot = False
        held, self._held = self._held, []
        for msg in sorted(held, key=lambda m: int(m["seq"])):
            self.apply(msg)

    def _gap(self) -> None:
        self.gaps += 1
        self.needs_snapshot = True
        self.synced = False   # hold further updates until the snapshot arrives

    def _set(self, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.table.pop(key, None)
        else:
            self.table[key] = value
