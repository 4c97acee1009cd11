"""Liveness bookkeeping: a peer is dead after `dead_after` silent intervals.

The heartbeat carries the peer's full state, so the last payload is also the last
known inventory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# the one declaration of liveness: a heartbeat every INTERVAL seconds, a peer dead
# after DEAD_AFTER silent intervals (the controller's and runners' settings default
# to these: config.checks.heartbeat_settings)
INTERVAL = 1.0
DEAD_AFTER = 5


@dataclass
class Peer:
    name: str
    last_seen: float
    payload: Any = None        # the last heartbeat's content, as the owner parsed it


class PeerTracker:
    def __init__(self, interval: float = INTERVAL, dead_after: int = DEAD_AFTER) -> None:
        self.interval = interval
        self.dead_after = dead_after
        self.peers: dict[str, Peer] = {}

    def seen(self, name: str, payload: Any = None,
             now: float | None = None) -> bool:
        """Record a heartbeat; returns True if the peer is new (or was dead)."""
        now = time.monotonic() if now is None else now
        new = name not in self.peers
        peer = self.peers.setdefault(name, Peer(name, now))
        peer.last_seen = now
        if payload is not None:
            peer.payload = payload
        return new

    def alive(self, now: float | None = None) -> list[Peer]:
        now = time.monotonic() if now is None else now
        limit = self.interval * self.dead_after
        return [p for p in self.peers.values() if now - p.last_seen <= limit]

    def reap(self, now: float | None = None) -> list[Peer]:
        """Forget and return the peers that went silent for too long."""
        now = time.monotonic() if now is None else now
        limit = self.interval * self.dead_after
        dead = [p for p in self.peers.values() if now - p.last_seen > limit]
        for p in dead:
            del self.peers[p.name]
        return dead
