"""The web health check: any HTTP answer below 500 means the instance can take traffic."""
from __future__ import annotations

import heapq
import http.client
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POLL_SECONDS = 0.2
CHECK_THREADS = 4       # HealthChecks' threads, however many instances are starting


def answers(address: str, port: int, host_header: str, timeout: float = 2.0,
            path: str = "/") -> bool:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host_header, "User-Agent": "berth-runner"})
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class _Check:
    tag: tuple[Any, ...]
    address: str
    port: int
    host_header: str
    path: str
    deadline: float
    wanted: Callable[[], bool]


class HealthChecks:
    """The health checks of every STARTING web instance, by CHECK_THREADS threads
    rather than one polling thread each: with 200 instances starting at once, 200
    pollers fought the runner's loop and its beat for the GIL (silences of 0.4-0.7 s,
    bench/failover.py). Each due check gets one attempt; one not answering yet comes
    back POLL_SECONDS later, until it answers (done(tag, True)), its `timeout` passes
    or `wanted()` turns False (done(tag, False))."""

    def __init__(self, done: Callable[[tuple[Any, ...], bool], None],
                 threads: int = CHECK_THREADS) -> None:
        self.done = done
        self.threads = threads
        self._due: list[tuple[float, int, _Check]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._started = 0

    def add(self, tag: tuple[Any, ...], address: str, port: int, host_header: str,
            timeout: float, wanted: Callable[[], bool], path: str = "/") -> None:
        now = time.monotonic()
        self._push(now, _Check(tag, address, port, host_header, path, now + timeout,
                               wanted))
        with self._cv:
            if self._started < self.threads:
                self._started += 1
                threading.Thread(target=self._work, name=f"health-{self._started}",
                                 daemon=True).start()

    def _push(self, at: float, check: _Check) -> None:
        with self._cv:
            heapq.heappush(self._due, (at, next(self._seq), check))
            self._cv.notify()

    def _next(self) -> _Check:
        with self._cv:
            while True:
                if self._due:
                    left = self._due[0][0] - time.monotonic()
                    if left <= 0:
                        return heapq.heappop(self._due)[2]
                    self._cv.wait(left)
                else:
                    self._cv.wait()

    def _work(self) -> None:
        while True:
            check = self._next()
            if not check.wanted():
                self.done(check.tag, False)
            elif answers(check.address, check.port, check.host_header,
                         timeout=min(2.0, max(0.1, check.deadline - time.monotonic())),
                         path=check.path):
                self.done(check.tag, True)
            elif time.monotonic() >= check.deadline:
                self.done(check.tag, False)
            else:
                self._push(time.monotonic() + POLL_SECONDS, check)
