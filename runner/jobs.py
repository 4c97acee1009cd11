"""Work that may block runs in threads; results come back as events on one queue.

Threads never touch a ZeroMQ socket or an Instance: they post `JobDone` or
`OutputLine` events and the daemon's loop, the only owner of sockets and instances,
acts on them.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024


@dataclass
class JobDone:
    tag: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None


@dataclass
class OutputLine:
    """One line of output: app stdout/stderr, build output or a platform event."""
    app: str
    line: str
    proc: str
    stream: str = "stdout"
    instance: str | None = None
    release: int | None = None
    build: str | None = None


class Jobs:
    def __init__(self, events: queue.Queue[Any],
                 wake: Callable[[], None] | None = None) -> None:
        self.events = events
        self.wake = wake or (lambda: None)      # ends the loop's poll when it waits

    def post(self, event: Any) -> None:
        self.events.put(event)

    def submit(self, tag: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in a thread; post JobDone(tag, result or error)."""
        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    log.exception("job %s died", tag[0])
                self.events.put(JobDone(tag, error=exc))
            else:
                self.events.put(JobDone(tag, result=result))
            self.wake()
        threading.Thread(target=work, name=f"job-{tag[0]}", daemon=True).start()

    def pool(self, name: str, size: int) -> Pool:
        """A fixed set of `size` threads taking jobs in order: for work that must not
        run a hundred at once (spawns fork the runner: a few in parallel is what pays)."""
        return Pool(self, name, size)

    def read_lines(self, pipe: IO[bytes], make: Callable[[str], OutputLine]) -> None:
        """Post every line of a pipe until EOF (when the whole process group closed it)."""
        def work() -> None:
            try:
                for raw in iter(lambda: pipe.readline(MAX_LINE), b""):
                    self.events.put(make(raw.decode("utf-8", "replace").rstrip("\r\n")))
            except (OSError, ValueError):
                pass
            finally:
                pipe.close()
        threading.Thread(target=work, name="output", daemon=True).start()


class Pool:
    """Bounded parallel jobs: `submit` queues, `size` worker threads run them in order
    and post JobDone like Jobs.submit. The threads start on first use and live as
    long as the process (daemon threads)."""

    def __init__(self, jobs: Jobs, name: str, size: int) -> None:
        self.jobs = jobs
        self.name = name
        self.size = size
        self._queue: queue.Queue[tuple[tuple[Any, ...], Callable[..., Any], tuple[Any, ...]]] \
            = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, tag: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((tag, fn, args))
        with self._lock:
            if len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self.name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued and not started yet."""
        return self._queue.qsize()

    def _work(self) -> None:
        while True:
            tag, fn, args = self._queue.get()
            try:
                result = fn(*args)
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    log.exception("job %s died", tag[0])
                self.jobs.post(JobDone(tag, error=exc))
            else:
                self.jobs.post(JobDone(tag, result=result))
            self.jobs.wake()
