"""Liveness bookkeeping: a peer is dead after `dead_after` silent intervals.

The heartbeat carries the peer's full state, so the last payload is also the last
known inventory. A runner also sends a `beat` every half interval from a thread of its
own (runner/beat.py): liveness only, never late however busy its loop is, so gaps stay
under one interval and the dead limit can be short enough to move routes off a dead
host in under 2 s (bench/failover.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# the one declaration of liveness: a heartbeat every INTERVAL seconds, a peer dead
# after DEAD_AFTER silent intervals (the controller's and runners' settings default
# to these: config.checks.heartbeat_settings)
INTERVAL = 0.5
DEAD_AFTER = 3
# a runner's beat socket's identity is its host id with this suffix: the controller
# keeps sending commands to the loop's own socket (identity = host id)
BEAT_SUFFIX = "/beat"


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

    def beat(self, name: str, loop_age: float, now: float | None = None) -> bool:
        """Count a liveness beat: only from a peer whose full heartbeat is known (the
        beat carries no inventory) and whose loop stepped within the dead limit (a
        wedged loop answers nothing). True when counted."""
        peer = self.peers.get(name)
        if peer is None or loop_age > self.interval * self.dead_after:
            return False
        peer.last_seen = time.monotonic() if now is None else now
        return True

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
