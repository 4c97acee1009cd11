"""The runner's liveness beat, on a thread of its own.

The loop sends the full heartbeat (the inventory) when something changed and every
interval, but a loop starting hundreds of instances or sharing two cores with a busy
machine can send it late, and the controller calls a host dead after
interval x dead_after silent seconds. So liveness does not depend on the loop: this
thread sends a small `beat` every half interval, on absolute deadlines, on a DEALER of
its own (a ZeroMQ socket belongs to one thread). Each beat says how long ago the loop
last stepped, so a wedged loop still ends up called dead.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from messaging.channels import connect
from messaging.envelope import make, send
from messaging.heartbeat import BEAT_SUFFIX

log = logging.getLogger("berth.runner")


class Beat:
    def __init__(self, ctx: zmq.Context, endpoint: str, host: str, interval: float,
                 loop_at: Callable[[], float]) -> None:
        self.ctx, self.endpoint, self.host = ctx, endpoint, host
        self.period = interval / 2
        self.loop_at = loop_at            # monotonic time of the loop's last step
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        sock = connect(self.ctx, "control", self.endpoint,
                       identity=self.host + BEAT_SUFFIX)
        try:
            due = time.monotonic()
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                now = time.monotonic()
                self.sent += 1
                try:
                    send(sock, make("beat", self.host, host=self.host, seq=self.sent,
                                    loop_age=round(now - self.loop_at(), 3)),
                         flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass            # no controller connected yet: nothing to tell
                # absolute deadlines: one late wake-up does not push the next one back
                due += self.period
                if due < now:
                    due = now + self.period
        except Exception:
            log.exception("the beat thread failed; liveness rests on the heartbeat")
        finally:
            sock.close(0)
