"""App and build logs: a bounded ring per app in memory (what `logs` and `logs -f`
read), every line also written to a file per app and per build, and waiting readers
woken on each new line (for `logs -f` and the live build log of `berth push`).

The controller's loop calls `append` for every entry of every `log_batch`, up to
thousands a second, so `append` and `build_line` touch no file: they put the line in
memory, wake the readers and queue it for a writer thread. Every FLUSH_INTERVAL the
writer formats what is queued, appends it to files it keeps open (at most MAX_OPEN,
the least recently used closed first) and flushes them, so a line reaches its file
within about FLUSH_INTERVAL. `forget` closes and removes an app's file at once and
drops its lines still queued. `close()` writes everything queued and closes the
files; call it when the controller stops (an atexit hook does it too, as a last
resort; a SIGKILL loses at most the last FLUSH_INTERVAL of lines from the files).
"""
from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict, deque
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1        # seconds between the writer's passes
MAX_OPEN = 256              # log files kept open at once
MAX_QUEUED = 200_000        # lines waiting for the writer; beyond, the files miss lines
SOURCES = {"router": "router", "platform": "berth", "build": "build"}

_stamp_cache: tuple[int, str] = (-1, "")


def _stamp(ts: Any) -> str:
    """`ts` as `%Y-%m-%dT%H:%M:%S` (UTC); the last second's text is reused."""
    global _stamp_cache
    try:
        second = math.floor(ts)             # as time.gmtime rounds
    except (TypeError, ValueError, OverflowError):
        second = 0
    cached = _stamp_cache
    if cached[0] == second:
        return cached[1]
    try:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    except (OverflowError, OSError, ValueError):
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(0))
    _stamp_cache = (second, text)
    return text


def format_line(entry: dict[str, Any]) -> str:
    """Heroku-style: `<time> <source>[<proc>.<instance>]: <line>`."""
    proc = entry.get("proc") or "app"
    if not isinstance(proc, str):
        proc = str(proc)
    source = SOURCES.get(proc, "app")
    where = proc if source != "app" else f"{proc}.{str(entry.get('instance', '?'))[:6]}"
    return f"{_stamp(entry.get('ts', 0))} {source}[{where}]: {entry.get('line', '')}"


class LogStore:
    def __init__(self, root: Path, keep: int = 5000, *, max_open: int = MAX_OPEN,
                 flush_interval: float = FLUSH_INTERVAL, max_queued: int = MAX_QUEUED) -> None:
        self.root = root
        (root / "apps").mkdir(parents=True, exist_ok=True)
        (root / "builds").mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.max_open = max(1, max_open)
        self.max_queued = max_queued
        self.dropped = 0                    # lines the files missed (queue full)
        # the last `keep` entries of an app; the last one is number _counters[app]
        # (no (number, entry) pairs: 50 apps' rings are 250,000 objects fewer for
        # the garbage collector to walk, and a batch allocates less)
        self._apps: dict[str, deque[dict[str, Any]]] = {}
        self._counters: dict[str, int] = {}
        self._builds: dict[str, list[str]] = {}
        self._builds_done: set[str] = set()
        self._gone: set[str] = set()        # destroyed apps: late lines are dropped
        self._cond = threading.Condition()
        # the files' side: (kind, name, epoch, entry | line | None) for the writer;
        # kind is "apps" or "builds", or "done" to close a finished build's file
        self._queue: deque[tuple[str, str, int, Any]] = deque()
        self._epochs: dict[str, int] = {}   # app -> forgets so far: older lines are dropped
        self._closed = False
        self._io = threading.Lock()         # the open files; taken before _cond, never after
        self._files: OrderedDict[tuple[str, str], IO[str]] = OrderedDict()
        self._reported_drops = 0
        self._stop = threading.Event()
        self._writer = threading.Thread(target=_write_loop, name="logstore-writer", daemon=True,
                                         args=(weakref.ref(self), self._stop, flush_interval))
        self._writer.start()
        _LIVE.add(self)

    # -- app logs -----------------------------------------------------------
    def append(self, app: str, entry: dict[str, Any]) -> None:
        with self._cond:
            if app in self._gone:
                return      # a runner's last events about an app destroyed meanwhile
            self._counters[app] = self._counters.get(app, 0) + 1
            ring = self._apps.get(app)
            if ring is None:
                ring = self._apps[app] = deque(maxlen=self.keep)
            ring.append(entry)
            self._queue_line("apps", app, self._epochs.get(app, 0), entry)
            self._cond.notify_all()
            closed = self._closed
        if closed:
            self._write_queued()    # after close(): written at once, as before it

    def tail(self, app: str, lines: int) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            ring = self._apps.get(app, ())
            return list(ring)[-lines:] if lines > 0 else [], self._counters.get(app, 0)

    def wait_after(self, app: str, after: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            self._cond.wait_for(lambda: self._counters.get(app, 0) > after, timeout)
            last = self._counters.get(app, 0)
            ring = self._apps.get(app, ())
            return list(ring)[-(last - after):] if last > after else [], last

    def forget(self, app: str) -> None:
        with self._io:
            with self._cond:
                self._gone.add(app)
                self._apps.pop(app, None)
                self._epochs[app] = self._epochs.get(app, 0) + 1   # queued lines: dropped
            self._close_file(("apps", app))
            (self.root / "apps" / f"{app}.log").unlink(missing_ok=True)

    def revive(self, app: str) -> None:
        """An app of a destroyed one's name was created again: log it anew."""
        with self._cond:
            self._gone.discard(app)

    # -- build logs ---------------------------------------------------------
    def build_line(self, build: str, line: str) -> None:
        with self._cond:
            self._builds.setdefault(build, []).append(line)
            self._queue_line("builds", build, 0, line)
            self._cond.notify_all()
            closed = self._closed
        if closed:
            self._write_queued()

    def build_done(self, build: str) -> None:
        with self._cond:
            self._builds_done.add(build)
            self._queue_line("done", build, 0, None)
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

    # -- the files ----------------------------------------------------------
    def flush(self) -> None:
        """Write every line queued so far to its file, now."""
        self._write_queued()

    def close(self) -> None:
        """Write what is queued, close the files and stop the writer. Lines that
        still come are written at once (opening the file each time)."""
        with self._cond:
            self._closed = True
        self._stop.set()
        if self._writer is not threading.current_thread():
            self._writer.join(10)
        self._write_queued()
        _LIVE.discard(self)

    def open_files(self) -> int:
        """How many log files the writer holds open."""
        with self._io:
            return len(self._files)

    def _queue_line(self, kind: str, name: str, epoch: int, item: Any) -> None:
        """Under _cond."""
        if len(self._queue) >= self.max_queued and kind != "done":
            self.dropped += 1
            return
        self._queue.append((kind, name, epoch, item))

    def _write_queued(self) -> None:
        """One writer pass: everything queued until now, appended and flushed."""
        with self._io:
            batches: dict[tuple[str, str], list[str]] = {}
            done: list[str] = []
            queue = self._queue
            for _ in range(len(queue)):     # lines queued meanwhile wait for the next pass
                kind, name, epoch, item = queue.popleft()
                if kind == "apps":
                    if epoch != self._epochs.get(name, 0):
                        continue                    # the app was destroyed since
                    try:
                        line = format_line(item)
                    except Exception:               # a malformed entry must not stop the rest
                        line = repr(item)
                elif kind == "builds":
                    line = item
                else:
                    done.append(name)
                    continue
                batches.setdefault((kind, name), []).append(line)
            written = []
            for key, lines in batches.items():
                lines.append("")
                try:
                    fh = self._file(key)
                    fh.write("\n".join(lines))
                    written.append(key)
                except (OSError, ValueError) as exc:
                    log.warning("log file write failed", extra={"file": f"{key[0]}/{key[1]}",
                                                                "error": str(exc)})
            for key in written:            # those evicted meanwhile were flushed on close
                still = self._files.get(key)
                if still is not None:
                    try:
                        still.flush()
                    except (OSError, ValueError) as exc:
                        log.warning("log file flush failed",
                                    extra={"file": f"{key[0]}/{key[1]}", "error": str(exc)})
            for build in done:
                self._close_file(("builds", build))
            if self._closed:
                for key in list(self._files):
                    self._close_file(key)
            if self.dropped != self._reported_drops:
                log.warning("log lines not written: the writer is behind",
                            extra={"dropped": self.dropped - self._reported_drops})
                self._reported_drops = self.dropped

    def _file(self, key: tuple[str, str]) -> IO[str]:
        """Under _io: the open file of `key`, opened (and the least recently used
        beyond max_open closed) if need be."""
        fh = self._files.get(key)
        if fh is not None:
            self._files.move_to_end(key)
            return fh
        while len(self._files) >= self.max_open:
            self._close_file(next(iter(self._files)))
        kind, name = key
        fh = open(self.root / kind / f"{name}.log", "a", encoding="utf-8", errors="replace")
        self._files[key] = fh
        return fh

    def _close_file(self, key: tuple[str, str]) -> None:
        """Under _io."""
        fh = self._files.pop(key, None)
        if fh is None:
            return
        try:
            fh.close()
        except OSError as exc:
            log.warning("log file close failed", extra={"file": f"{key[0]}/{key[1]}",
                                                        "error": str(exc)})


def _write_loop(ref: weakref.ref[LogStore], stop: threading.Event, interval: float) -> None:
    """The writer thread: holds the store only during a pass, so a store nobody
    keeps is collected (and this thread ends) even if it was never closed."""
    while not stop.wait(interval):
        store = ref()
        if store is None:
            return
        try:
            store._write_queued()
        except Exception:                     # keep writing the next passes
            log.exception("log writer pass failed")
        del store


_LIVE: weakref.WeakSet[LogStore] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for store in list(_LIVE):
        store.close()
