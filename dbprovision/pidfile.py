"""Daemons Berth starts and later stops by the PID in their pid file (pgbouncer,
redis-server, redis-sentinel): one reading of the file, one TERM-then-KILL."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def terminate(pid: int, alive: Callable[[int], bool], timeout: float) -> None:
    """SIGTERM, then SIGKILL every 5 s past `timeout`, until `alive(pid)` is false
    (`alive` also says the pid is still the daemon we started, not a reused one)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 5
        time.sleep(0.01)
