"""The builds the controller is carrying, each an explicit state machine.

    QUEUED --prepare sent--> PREPARING --reply--> CATCHING_UP --lines in--> SUCCEEDED
      |                          |                    |     (or deadline)    ^
      |                          |                    +--Procfile has a      | exit 0
      |                          |                    |  release: line --> RELEASING
      +-- no runner in time -----+-- lost / timeout --+-------------------+--+--> FAILED
                                                        (exit != 0, lost, refused)

A build's output travels on the logs channel and its end on the control channel, so
the reply can overtake the last lines: CATCHING_UP waits (at most LOG_CATCH_UP s)
until as many lines arrived as the reply says were sent, and only then the build
ends and the streamed log closes. RELEASING is Heroku's release phase: the Procfile's
`release:` command runs once, as a one-off run of the new code with the new config,
before the release exists; only its exit 0 makes the release, so a failing one
leaves the previous release serving. The API threads only `submit`; everything else is
the loop thread's.
"""
from __future__ import annotations

import enum
import queue
from dataclasses import dataclass
from typing import Any

from messaging.errors import BerthError

NO_RUNNER_WAIT = 30.0     # seconds a build waits for a runner to connect
BUILD_TIMEOUT = 900.0     # seconds a runner may take to prepare
LOG_CATCH_UP = 3.0        # seconds a finished build waits for its last log lines


class BuildState(str, enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    CATCHING_UP = "catching_up"
    RELEASING = "releasing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TRANSITIONS: dict[BuildState, frozenset[BuildState]] = {
    BuildState.QUEUED: frozenset({BuildState.PREPARING, BuildState.FAILED}),
    BuildState.PREPARING: frozenset({BuildState.CATCHING_UP, BuildState.FAILED}),
    BuildState.CATCHING_UP: frozenset({BuildState.SUCCEEDED, BuildState.RELEASING,
                                       BuildState.FAILED}),
    BuildState.RELEASING: frozenset({BuildState.SUCCEEDED, BuildState.FAILED}),
    BuildState.SUCCEEDED: frozenset(),
    BuildState.FAILED: frozenset(),
}


class BuildTransitionError(RuntimeError):
    pass


@dataclass
class Build:
    id: str
    queued_at: float
    state: BuildState = BuildState.QUEUED
    host: str | None = None
    started: float = 0.0
    lines_received: int = 0           # runner lines that arrived on the logs channel
    lines_expected: int = 0           # what the reply says the runner sent
    catch_up_until: float = 0.0
    result: dict[str, Any] | None = None
    error: BerthError | None = None
    release_run: str | None = None    # the release phase's run id, while RELEASING

    def _to(self, new: BuildState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise BuildTransitionError(f"build {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    def dispatched(self, host: str, now: float) -> None:
        self._to(BuildState.PREPARING)
        self.host, self.started = host, now

    def answered(self, now: float, log_lines: int, result: dict[str, Any] | None = None,
                 error: BerthError | None = None) -> None:
        self._to(BuildState.CATCHING_UP)
        self.result, self.error = result, error
        self.lines_expected = log_lines
        self.catch_up_until = now + LOG_CATCH_UP

    def caught_up(self, now: float) -> bool:
        return self.state is BuildState.CATCHING_UP and (
            self.lines_received >= self.lines_expected or now >= self.catch_up_until)

    def finish(self) -> None:
        self._to(BuildState.FAILED if self.error is not None else BuildState.SUCCEEDED)

    def releasing(self, run_id: str) -> None:
        """The build is good; its release phase runs before the release is made."""
        self._to(BuildState.RELEASING)
        self.release_run = run_id

    def released(self) -> None:
        self._to(BuildState.SUCCEEDED)

    def fail(self, error: BerthError) -> None:
        self.error = error
        self._to(BuildState.FAILED)

    @property
    def done(self) -> bool:
        return self.state in (BuildState.SUCCEEDED, BuildState.FAILED)


class Builds:
    """Builds from submit to their end; a finished build leaves the table."""

    def __init__(self) -> None:
        self._incoming: queue.Queue[str] = queue.Queue()
        self.active: dict[str, Build] = {}

    def submit(self, build_id: str) -> None:
        """Thread-safe: the API hands a stored build to the loop."""
        self._incoming.put(build_id)

    def take_new(self, now: float) -> None:
        while True:
            try:
                build_id = self._incoming.get_nowait()
            except queue.Empty:
                return
            self.active.setdefault(build_id, Build(build_id, now))

    def in_state(self, state: BuildState) -> list[Build]:
        return [b for b in self.active.values() if b.state is state]

    def line(self, build_id: str) -> None:
        build = self.active.get(build_id)
        if build is not None:
            build.lines_received += 1

    def forget_done(self) -> None:
        for build_id in [b.id for b in self.active.values() if b.done]:
            del self.active[build_id]
