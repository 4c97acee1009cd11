"""Backend bookkeeping without I/O: which instance gets the next request, which are
down (with exponential backoff), and the idle keep-alive connections per backend.

Choice is "least outstanding of two random choices": cheap, and it avoids the herd
that pure least-outstanding sends to a backend that just came back. Connections
are opaque objects here; exchange.py opens, checks and closes them.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from messaging import shapes
from messaging.shapes import Route

BASE_BACKOFF: Final = 0.5      # seconds down after the first failure, doubled after each
MAX_BACKOFF: Final = 30.0
MAX_IDLE: Final = 64           # idle keep-alive connections kept per backend
IDLE_TTL: Final = 4.0          # seconds an idle backend connection may be reused


@dataclass
class Backend:
    key: str
    address: str
    port: int
    id: str = ""
    outstanding: int = 0
    failures: int = 0
    down_until: float = 0.0
    idle: list[tuple[Any, float]] = field(default_factory=list)

    def is_up(self, now: float) -> bool:
        return now >= self.down_until


class Pool:
    """Every backend of every app, keyed by address:port."""

    def __init__(self, rng: random.Random | None = None, *,
                 base_backoff: float = BASE_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 max_idle: int = MAX_IDLE, idle_ttl: float = IDLE_TTL) -> None:
        self.rng = rng or random.Random()
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self.backends: dict[str, Backend] = {}

    def sync(self, routes: Mapping[str, Route]) -> list[Any]:
        """Follow a new route table: keep the state of backends still listed, add
        new ones, forget gone ones. Returns idle connections the caller closes."""
        wanted: dict[str, shapes.Backend] = {}
        for route in routes.values():
            for entry in (*route.backends, *route.static_backends):
                wanted[entry.key] = entry
        to_close: list[Any] = []
        for key in list(self.backends):
            if key not in wanted:
                to_close.extend(conn for conn, _ in self.backends.pop(key).idle)
        for key, entry in wanted.items():
            if key not in self.backends:
                self.backends[key] = Backend(key, entry.address, entry.port, entry.id)
        return to_close

    def _get(self, entry: shapes.Backend) -> Backend:
        key = entry.key
        backend = self.backends.get(key)
        if backend is None:   # route seen before sync: track it anyway
            backend = self.backends[key] = Backend(key, entry.address, entry.port, entry.id)
        return backend

    def choose(self, entries: Iterable[shapes.Backend], exclude: set[str],
               now: float, up_only: bool = False) -> Backend | None:
        """Pick a backend for one attempt, skipping keys in `exclude` (already
        tried for this request). Up backends first; when every one left is down,
        the one whose backoff ends soonest (it may have recovered), or none with
        `up_only` (the caller has somewhere else to go)."""
        candidates = [self._get(e) for e in entries if e.key not in exclude]
        if not candidates:
            return None
        up = [b for b in candidates if b.is_up(now)]
        if not up:
            return None if up_only else min(candidates, key=lambda b: b.down_until)
        if len(up) == 1:
            return up[0]
        # two distinct ones at random, as rng.sample(up, 2) but without its
        # interpreted Python (most of this function's cost, at two instances)
        n = len(up)
        i = int(self.rng.random() * n)
        j = int(self.rng.random() * (n - 1))
        a, b = up[i], up[j + 1 if j >= i else j]
        return b if b.outstanding < a.outstanding else a

    def mark_down(self, backend: Backend, now: float) -> float:
        """Record a failure; returns the backoff in seconds. Failures of requests
        that were already under way when the backend went down do not count again:
        only a failure while it was up (or after its backoff ended) doubles it."""
        if not backend.is_up(now):
            return backend.down_until - now
        backend.failures += 1
        backoff = min(self.max_backoff, self.base_backoff * 2 ** (backend.failures - 1))
        backend.down_until = now + backoff
        return backoff

    def mark_up(self, backend: Backend) -> None:
        backend.failures = 0
        backend.down_until = 0.0

    def acquire(self, backend: Backend) -> None:
        backend.outstanding += 1

    def release(self, backend: Backend) -> None:
        backend.outstanding = max(0, backend.outstanding - 1)

    def take_idle(self, backend: Backend, now: float) -> tuple[Any | None, list[Any]]:
        """The freshest idle connection still within its TTL, and the expired ones
        for the caller to close."""
        conn, _, expired = self.take_idle_aged(backend, now)
        return conn, expired

    def take_idle_aged(self, backend: Backend, now: float
                       ) -> tuple[Any | None, float, list[Any]]:
        """As take_idle, with how long that connection was idle. The list is in
        put order (callers pass a non-decreasing `now`), so when its oldest entry is
        within the TTL none has expired and nothing is copied."""
        idle = backend.idle
        expired: list[Any] = []
        if idle and now - idle[0][1] > self.idle_ttl:
            expired = [c for c, since in idle if now - since > self.idle_ttl]
            idle[:] = [(c, s) for c, s in idle if now - s <= self.idle_ttl]
        if not idle:
            return None, 0.0, expired
        conn, since = idle.pop()
        return conn, now - since, expired

    def put_idle(self, backend: Backend, conn: Any, now: float) -> list[Any]:
        """Keep a reusable connection; returns any it displaced (to close)."""
        if self.backends.get(backend.key) is not backend:
            return [conn]     # backend left the table meanwhile
        backend.idle.append((conn, now))
        overflow = backend.idle[:-self.max_idle]
        backend.idle = backend.idle[-self.max_idle:]
        return [c for c, _ in overflow]
