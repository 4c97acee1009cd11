"""Per-app counters for the stats channel, without I/O.

The engine calls `record()` once per answered request and `attach()`/`detach()` as
client connections start serving an app and close; every interval the daemon calls
`collect()`, which returns the figures of the interval just ended (the shape the
`stats` message declares: requests, status classes, bytes in/out, latency p50/p95/p99
in ms, open connections) and starts a new interval. Open connections are a gauge,
the rest are per-interval counts.

Latencies are kept in a reservoir of at most RESERVOIR samples per app and interval
(Vitter's algorithm R), so memory stays flat whatever the request rate and the
percentiles stay unbiased.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Final

RESERVOIR: Final = 1024
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
NO_APP: Final = "-"          # requests no app took (unknown host, bad request)


def status_class(status: int) -> str:
    """'2xx' for 204; statuses outside 100..599 count as 5xx (our failure)."""
    return STATUS_CLASSES[status // 100 - 1] if 100 <= status < 600 else "5xx"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-int(fraction * 1000) * len(sorted_values) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class AppCounters:
    requests: int = 0
    status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    bytes_in: int = 0
    bytes_out: int = 0
    latencies: list[float] = field(default_factory=list)
    seen: int = 0                # latencies offered this interval (for the reservoir)
    open: int = 0                # client connections now serving this app (a gauge)

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {"requests": self.requests, "status": dict(self.status),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "p50_ms": round(percentile(ordered, 0.50), 3),
                "p95_ms": round(percentile(ordered, 0.95), 3),
                "p99_ms": round(percentile(ordered, 0.99), 3),
                "open": self.open}

    def reset(self) -> None:
        self.requests = self.bytes_in = self.bytes_out = self.seen = 0
        self.status = dict.fromkeys(STATUS_CLASSES, 0)
        self.latencies = []


class Stats:
    def __init__(self, rng: random.Random | None = None,
                 reservoir: int = RESERVOIR) -> None:
        self.rng = rng or random.Random()
        self._random = self.rng.random   # bound once: no method lookup per request
        self.reservoir = reservoir
        self.apps: dict[str, AppCounters] = {}
        self.connections = 0         # every open client connection, app or not

    def _app(self, app: str) -> AppCounters:
        counters = self.apps.get(app)
        if counters is None:
            counters = self.apps[app] = AppCounters()
        return counters

    # -- what the engine reports ------------------------------------------------------

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self, app: str | None) -> None:
        self.connections = max(0, self.connections - 1)
        self.detach(app)

    def attach(self, old: str | None, new: str) -> str:
        """A connection that served `old` (or nothing yet) now serves `new`;
        returns `new` for the caller to remember."""
        if old != new:
            self.detach(old)
            self._app(new).open += 1
        return new

    def detach(self, app: str | None) -> None:
        if app is not None and app in self.apps:
            counters = self.apps[app]
            counters.open = max(0, counters.open - 1)

    def record(self, app: str | None, status: int, bytes_in: int, bytes_out: int,
               ms: float) -> None:
        counters = self._app(app or NO_APP)
        counters.requests += 1
        counters.status[status_class(status)] += 1
        counters.bytes_in += bytes_in
        counters.bytes_out += bytes_out
        counters.seen += 1
        if len(counters.latencies) < self.reservoir:
            counters.latencies.append(ms)
        else:
            slot = int(self._random() * counters.seen)   # randrange's cost, thrice
            if slot < self.reservoir:
                counters.latencies[slot] = ms

    # -- what the daemon publishes ---------------------------------------------------

    def collect(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(apps, totals) for the interval just ended, and start a new one. Apps
        with neither requests nor open connections are left out (and forgotten)."""
        apps: dict[str, dict[str, Any]] = {}
        totals = {"requests": 0, "connections": self.connections}
        for app in list(self.apps):
            counters = self.apps[app]
            if counters.requests or counters.open:
                apps[app] = counters.figures()
                totals["requests"] += counters.requests
                counters.reset()
            else:
                del self.apps[app]
        return apps, totals
