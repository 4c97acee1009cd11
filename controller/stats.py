"""The stats forwarder: balancers and runners publish on the stats channel (XSUB
here), operators subscribe to stats_out (XPUB). The forwarder runs in its own
thread (it owns both sockets) and keeps each host's latest message so the API can
serve per-app figures without a subscriber of its own.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from messaging import channels, envelope
from messaging.errors import ProtocolError

log = logging.getLogger(__name__)

FRESH = 3.0        # seconds a host's figures count as current


def merge(per_host: list[dict[str, Any]], app: str | None) -> dict[str, dict[str, Any]]:
    """Sum the hosts' figures per app; latency percentiles are request-weighted."""
    out: dict[str, dict[str, Any]] = {}
    for msg in per_host:
        for name, fig in msg.get("apps", {}).items():
            if app is not None and name != app:
                continue
            acc = out.setdefault(name, {"requests": 0, "status": {}, "bytes_in": 0,
                                        "bytes_out": 0, "open": 0, "sources": 0,
                                        "_w": {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}})
            n = int(fig.get("requests", 0))
            acc["requests"] += n
            acc["sources"] += 1
            for key in ("bytes_in", "bytes_out", "open"):
                acc[key] += int(fig.get(key, 0))
            for cls, count in (fig.get("status") or {}).items():
                acc["status"][cls] = acc["status"].get(cls, 0) + int(count)
            for key in acc["_w"]:
                acc["_w"][key] += float(fig.get(key) or 0.0) * n
    for acc in out.values():
        weights = acc.pop("_w")
        for key, total in weights.items():
            acc[key] = round(total / acc["requests"], 2) if acc["requests"] else None
    return out


class StatsHub:
    def __init__(self, ctx: zmq.Context, in_endpoint: str, out_endpoint: str) -> None:
        self.ctx = ctx
        self.in_endpoint = in_endpoint
        self.out_endpoint = out_endpoint
        self._latest: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)
        self.seq = 0

    def start(self) -> None:
        ready = threading.Event()
        self._error: Exception | None = None
        self._ready = ready
        self._thread.start()
        ready.wait(5)
        if self._error:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            xsub = channels.bind(self.ctx, "stats", self.in_endpoint)
            xpub = channels.bind(self.ctx, "stats_out", self.out_endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        envelope.subscribe_upstream(xsub, "stats")   # the hub itself wants every message
        self._ready.set()
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(200):
                    if sock is xpub:                 # subscriptions flow upstream
                        xsub.send(xpub.recv())
                        continue
                    frames = xsub.recv_multipart()
                    xpub.send_multipart(frames)
                    self._keep(frames)
        finally:
            xsub.close(0)
            xpub.close(0)

    def _keep(self, frames: list[bytes]) -> None:
        try:
            msg = envelope.decode(frames)
        except ProtocolError as exc:
            log.warning("dropped bad stats message", extra={"error": exc.message})
            return
        # a balancer with several worker processes sends one message per worker
        source = f"{msg['host']}/{(msg.get('totals') or {}).get('pid', '')}"
        with self._cond:
            self._latest[source] = (time.monotonic(), {**msg.fields, "ts": msg.ts})
            self.seq += 1
            self._cond.notify_all()

    def current(self, app: str | None = None) -> dict[str, Any]:
        """Per-app figures summed over the hosts heard from in the last FRESH s."""
        now = time.monotonic()
        with self._cond:
            fresh = [m for t, m in self._latest.values() if now - t <= FRESH]
            hosts = sorted({m["host"] for m in fresh})
        return {"hosts": hosts, "apps": merge(fresh, app), "ts": time.time()}

    def wait(self, after: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.seq > after, timeout)
            return self.seq
