"""What a balancer worker tells the controller, written once for both engines:
access-log lines in `log_batch` messages and per-app figures in one `stats`
message per interval. Sends never block the proxy: a full channel drops the message
and counts it. The engines only call `flush` and `publish_stats` on their timers.
"""
from __future__ import annotations

import os
from typing import Any

import zmq

from balancer.stats import Stats
from messaging.envelope import make, send

LOG_FLUSH_INTERVAL = 0.1    # seconds between access-log batches
LOG_BATCH_MAX = 500         # entries that send a batch at once


class Telemetry:
    def __init__(self, host_id: str, stats_interval: float, stats: Stats) -> None:
        self.host_id = host_id
        self.stats_interval = float(stats_interval)
        self.stats = stats
        self.logs: Any = None          # PUSH on the logs channel
        self.stats_pub: Any = None     # PUB on the stats channel
        self.entries: list[dict[str, Any]] = []
        self.dropped_logs = 0
        self.dropped_stats = 0

    def access(self, app: str, line: str) -> None:
        """Queue one access-log line; a full batch leaves at once."""
        self.entries.append({"app": app, "line": line, "proc": "router",
                             "host": self.host_id})
        if len(self.entries) >= LOG_BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        entries, self.entries = self.entries, []
        if not entries or self.logs is None or self.logs.closed:
            return
        try:
            send(self.logs, make("log_batch", self.host_id, entries=entries),
                 flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_logs += len(entries)

    def publish_stats(self) -> None:
        """One `stats` message for the interval just ended."""
        if self.stats_pub is None or self.stats_pub.closed:
            return
        apps, totals = self.stats.collect()
        totals.update(pid=os.getpid(), dropped_logs=self.dropped_logs,
                      dropped_stats=self.dropped_stats)
        try:
            send(self.stats_pub, make("stats", self.host_id, host=self.host_id,
                                      interval=self.stats_interval, apps=apps,
                                      kind="balancer", totals=totals),
                 flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_stats += 1

    def close(self, linger_ms: int = 200) -> None:
        """Send what is left, then close (the last messages get `linger_ms`)."""
        self.publish_stats()
        self.flush()
        for sock in (self.logs, self.stats_pub):
            if sock is not None and not sock.closed:
                sock.close(linger=linger_ms)
