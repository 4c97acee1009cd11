"""App and build logs: a bounded ring per app in memory, every line also appended to
a file per app, and waiting readers woken on each new line (for `logs -f` and the
live build log of `berth push`).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any


def format_line(entry: dict[str, Any]) -> str:
    """Heroku-style: `<time> <source>[<proc>.<instance>]: <line>`."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.get("ts", 0)))
    proc = entry.get("proc") or "app"
    source = {"router": "router", "platform": "berth", "build": "build"}.get(proc, "app")
    where = proc if source != "app" else f"{proc}.{entry.get('instance', '?')[:6]}"
    return f"{ts} {source}[{where}]: {entry.get('line', '')}"


class LogStore:
    def __init__(self, root: Path, keep: int = 5000) -> None:
        self.root = root
        (root / "apps").mkdir(parents=True, exist_ok=True)
        (root / "builds").mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._apps: dict[str, deque[tuple[int, dict[str, Any]]]] = {}
        self._counters: dict[str, int] = {}
        self._builds: dict[str, list[str]] = {}
        self._builds_done: set[str] = set()
        self._gone: set[str] = set()        # destroyed apps: late lines are dropped
        self._cond = threading.Condition()

    # -- app logs -----------------------------------------------------------
    def append(self, app: str, entry: dict[str, Any]) -> None:
        with self._cond:
            if app in self._gone:
                return      # a runner's last events about an app destroyed meanwhile
            n = self._counters.get(app, 0) + 1
            self._counters[app] = n
            self._apps.setdefault(app, deque(maxlen=self.keep)).append((n, entry))
            with open(self.root / "apps" / f"{app}.log", "a") as fh:
                fh.write(format_line(entry) + "\n")
            self._cond.notify_all()

    def tail(self, app: str, lines: int) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            ring = self._apps.get(app, deque())
            entries = list(ring)[-lines:] if lines > 0 else []
            return [e for _, e in entries], self._counters.get(app, 0)

    def wait_after(self, app: str, after: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            self._cond.wait_for(lambda: self._counters.get(app, 0) > after, timeout)
            ring = self._apps.get(app, deque())
            return [e for n, e in ring if n > after], self._counters.get(app, 0)

    def forget(self, app: str) -> None:
        with self._cond:
            self._gone.add(app)
            self._apps.pop(app, None)
            (self.root / "apps" / f"{app}.log").unlink(missing_ok=True)

    def revive(self, app: str) -> None:
        """An app of a destroyed one's name was created again: log it anew."""
        with self._cond:
            self._gone.discard(app)

    # -- build logs ---------------------------------------------------------
    def build_line(self, build: str, line: str) -> None:
        with self._cond:
            self._builds.setdefault(build, []).append(line)
            with open(self.root / "builds" / f"{build}.log", "a") as fh:
                fh.write(line + "\n")
            self._cond.notify_all()

    def build_done(self, build: str) -> None:
        with self._cond:
            self._builds_done.add(build)
            self._cond.notify_all()

    def build_read(self, build: str, offset: int, timeout: float) -> tuple[list[str], bool]:
        """Lines from `offset` on, waiting up to `timeout` for some; and whether done."""
        with self._cond:
            if build not in self._builds:
                path = self.root / "builds" / f"{build}.log"
                if path.exists():      # a build from before a restart
                    self._builds[build] = path.read_text().splitlines()
                    self._builds_done.add(build)
            self._cond.wait_for(lambda: len(self._builds.get(build, [])) > offset
                                or build in self._builds_done, timeout)
            return self._builds.get(build, [])[offset:], build in self._builds_done
