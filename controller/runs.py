"""The one-off runs the controller is carrying, each an explicit state machine, and
what a run's output goes to (a sink).

    QUEUED --run sent--> STARTING --run_started--> RUNNING --run_exit--> EXITED
      |                     |                         |
      +-- no runner --------+-- refused, lost, -------+-- runner lost / forgot it --> FAILED
                                prepare failed

A run is placed like a build (controller/daemon.py), its `run` command goes on
control and its streams on the attach channel. What its output reaches is a sink:
an `Attachment` (a `berth run` client on an API thread, through thread-safe queues)
or `Callbacks` (code in the controller, e.g. the release phase, called on the loop
thread). A sink says how many output bytes it has delivered, which the loop
acknowledges to the runner (credit window: messaging.messages.RUN_WINDOW), so a
client that reads slowly slows the command instead of filling the controller.

The API threads only `submit` and use Attachments; the rest is the loop thread's.
"""
from __future__ import annotations

import enum
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from messaging import runframes
from messaging.errors import BerthError
from messaging.messages import RUN_CHUNK, RUN_WINDOW

NO_RUNNER_WAIT = 15.0     # seconds a run waits for a runner to connect
START_TIMEOUT = 900.0     # seconds from the run command to run_started (a venv build)
ATTACH_WAIT = 30.0        # seconds an attached run waits for its client
LOST_AFTER = 10.0         # seconds a RUNNING run may be missing from its host's heartbeats
KEEP_DONE = 60.0          # seconds an ended run stays for a client that attaches late
LINGER = 5.0              # seconds the API keeps a finished client's connection


class RunState(str, enum.Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.STARTING, RunState.FAILED}),
    # a quick command may exit before its run_started is handled: never, the runner
    # sends run_started first on the same socket; but an ended one exits at once
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.EXITED, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.EXITED, RunState.FAILED}),
    RunState.EXITED: frozenset(),
    RunState.FAILED: frozenset(),
}


class RunTransitionError(RuntimeError):
    pass


def new_run_id() -> str:
    return secrets.token_hex(4)


class Sink(Protocol):
    """Where a run's output goes. Called on the loop thread."""

    def output(self, stream: str, data: bytes) -> None: ...

    def delivered(self) -> int:
        """Output bytes delivered since the last call (acknowledged to the runner)."""
        ...

    def ended(self, run: Run) -> None:
        """The run is over (run.state EXITED or FAILED; run.code, run.error)."""
        ...


@dataclass
class Run:
    id: str
    app: str
    release: int
    slug: str
    command: str
    env: dict[str, str]
    sink: Sink
    tty: bool = False
    cols: int = 80
    rows: int = 24
    detach: bool = False
    timeout: float = 3600.0
    memory_mb: int | None = None
    pids_max: int | None = None
    manifest: dict[str, Any] | None = None      # messaging.manifest.Manifest, wire form
    state: RunState = RunState.QUEUED
    host: str | None = None
    queued_at: float = 0.0
    sent_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    seen_at: float = 0.0          # last heartbeat of its host that listed it
    code: int | None = None
    reason: str = ""
    error: BerthError | None = None
    end_sent: bool = False
    input_in_flight: int = 0      # run_input bytes sent, not yet acknowledged
    wall: float = field(default_factory=time.time)

    def _to(self, new: RunState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RunTransitionError(f"run {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    def sent(self, host: str, now: float) -> None:
        self._to(RunState.STARTING)
        self.host, self.sent_at, self.seen_at = host, now, now

    def started(self, now: float) -> None:
        if self.state is RunState.STARTING:
            self._to(RunState.RUNNING)
            self.started_at = self.seen_at = now

    def exited(self, now: float, code: int, reason: str) -> None:
        self._to(RunState.EXITED)
        self.code, self.reason, self.ended_at = code, reason, now

    def fail(self, now: float, error: BerthError) -> None:
        self._to(RunState.FAILED)
        self.error, self.reason, self.ended_at = error, error.message, now
        self.code = 1

    @property
    def done(self) -> bool:
        return self.state in (RunState.EXITED, RunState.FAILED)

    @property
    def proc(self) -> str:
        return f"run.{self.id}"


class Runs:
    """Runs from submit until a while after their end."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self._incoming: queue.Queue[Run] = queue.Queue()
        self._lock = threading.Lock()
        self._all: dict[str, Run] = {}          # any thread may look a run up
        self.active: dict[str, Run] = {}        # the loop's
        self.wake = wake

    def submit(self, run: Run) -> None:
        """Thread-safe: hand a new run to the loop."""
        with self._lock:
            self._all[run.id] = run
        self._incoming.put(run)
        self.wake()

    def lookup(self, run_id: str) -> Run | None:
        """Thread-safe."""
        with self._lock:
            return self._all.get(run_id)

    def take_new(self, now: float) -> None:
        while True:
            try:
                run = self._incoming.get_nowait()
            except queue.Empty:
                return
            run.queued_at = now
            self.active[run.id] = run

    def in_state(self, state: RunState) -> list[Run]:
        return [r for r in self.active.values() if r.state is state]

    def forget_done(self, now: float, keep: float = KEEP_DONE) -> list[Run]:
        gone = [r for r in self.active.values() if r.done and now - r.ended_at >= keep]
        with self._lock:
            for run in gone:
                del self.active[run.id]
                self._all.pop(run.id, None)
        return gone


# ---- sinks ---------------------------------------------------------------------------
@dataclass
class Callbacks:
    """A sink for code inside the controller: on_output(stream, data) and on_exit(run),
    both on the loop thread. Output counts as delivered once the callback returned."""

    on_output: Callable[[str, bytes], None] | None = None
    on_exit: Callable[[Run], None] | None = None
    _delivered: int = 0

    def output(self, stream: str, data: bytes) -> None:
        if self.on_output is not None:
            self.on_output(stream, data)
        self._delivered += len(data)

    def delivered(self) -> int:
        n, self._delivered = self._delivered, 0
        return n

    def ended(self, run: Run) -> None:
        if self.on_exit is not None:
            self.on_exit(run)


@dataclass(frozen=True)
class ClientEvent:
    """What a client sent, for the loop to pass on: kind is a runframes kind."""
    kind: bytes
    data: bytes = b""
    cols: int = 0
    rows: int = 0
    signal: str = ""


class Attachment:
    """The meeting point of a run's client (an API thread holding the upgraded
    connection) and the loop. Thread-safe.

    Loop side: `output`, `ended`, `delivered`, `take_input`, `input_acked`, `gone`.
    Client side: `claim`, `next_frame`, `sent`, `client_sent` (waits while the input
    window is full), `hang_up`.
    """

    def __init__(self) -> None:
        self._frames: queue.Queue[tuple[bytes, int, bool]] = queue.Queue()
        self._cond = threading.Condition()
        self._input: deque[ClientEvent] = deque()
        self._in_flight = 0           # input bytes taken from the client, not acknowledged
        self._delivered = 0
        self._claimed = False
        self._gone = threading.Event()
        self.finished = threading.Event()
        self.wake: Callable[[], None] = lambda: None

    # -- loop side ---------------------------------------------------------------
    def output(self, stream: str, data: bytes) -> None:
        kind = runframes.STREAM_KINDS.get(stream, runframes.OUTPUT)
        for i in range(0, len(data), runframes.MAX_FRAME):
            part = data[i:i + runframes.MAX_FRAME]
            self._frames.put((runframes.frame(kind, part), len(part), False))

    def ended(self, run: Run) -> None:
        if run.error is not None and run.state is RunState.FAILED:
            final = runframes.error_frame(run.error.to_dict())
        else:
            final = runframes.exit_frame(run.code if run.code is not None else 1, run.reason)
        self._frames.put((final, 0, True))
        self.finished.set()

    def delivered(self) -> int:
        with self._cond:
            n, self._delivered = self._delivered, 0
        return n

    def take_input(self) -> list[ClientEvent]:
        """Client events in order; neighbouring stdin chunks joined up to RUN_CHUNK."""
        out: list[ClientEvent] = []
        with self._cond:
            while self._input:
                event = self._input.popleft()
                last = out[-1] if out else None
                if event.kind == runframes.STDIN and last is not None \
                        and last.kind == runframes.STDIN \
                        and len(last.data) + len(event.data) <= RUN_CHUNK:
                    out[-1] = ClientEvent(runframes.STDIN, last.data + event.data)
                else:
                    out.append(event)
        return out

    def input_acked(self, n: int) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - n)
            self._cond.notify_all()

    def gone(self) -> bool:
        return self._gone.is_set()

    @property
    def claimed(self) -> bool:
        return self._claimed

    # -- client side (an API thread) ---------------------------------------------------
    def claim(self) -> bool:
        """One client per run: False when one is (or was) attached already."""
        with self._cond:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def next_frame(self, timeout: float) -> tuple[bytes, int, bool] | None:
        """(frame, output bytes in it, final) or None after `timeout`."""
        try:
            return self._frames.get(timeout=timeout)
        except queue.Empty:
            return None

    def sent(self, n: int) -> None:
        """`n` output bytes reached the client's socket."""
        if n:
            with self._cond:
                self._delivered += n
            self.wake()

    def client_sent(self, kind: bytes, payload: bytes) -> None:
        """A frame from the client. Stdin waits while RUN_WINDOW bytes are unacknowledged
        (the client's TCP connection then backs up to it), until the run is over."""
        if kind == runframes.STDIN:
            with self._cond:
                while self._in_flight >= RUN_WINDOW and not self.finished.is_set() \
                        and not self._gone.is_set():
                    self._cond.wait(0.5)
                self._in_flight += len(payload)
                self._input.append(ClientEvent(kind, payload))
        elif kind == runframes.RESIZE:
            cols, rows = runframes.parse_resize(payload)
            with self._cond:
                self._input.append(ClientEvent(kind, cols=cols, rows=rows))
        elif kind == runframes.SIGNAL:
            name = runframes.check_signal(payload.decode(errors="replace"))
            with self._cond:
                self._input.append(ClientEvent(kind, signal=name))
        elif kind == runframes.STDIN_EOF:
            with self._cond:
                self._input.append(ClientEvent(kind))
        else:
            return
        self.wake()

    def hang_up(self) -> None:
        """The client's connection is gone."""
        self._gone.set()
        with self._cond:
            self._cond.notify_all()
        self.wake()


class LineSplitter:
    """Turns a run's output bytes into whole lines (for a build log, say); a partial
    last line is kept until more comes or `close`."""

    def __init__(self, emit: Callable[[str], None], max_line: int = 64 * 1024) -> None:
        self.emit = emit
        self.max_line = max_line
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self.emit(line.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self._buf) > self.max_line:
            self.emit(self._buf.decode("utf-8", "replace"))
            self._buf = b""

    def close(self) -> None:
        if self._buf:
            self.emit(self._buf.rstrip(b"\r").decode("utf-8", "replace"))
            self._buf = b""
