"""`berth up` supervises its children, as supervisord and circus do.

Every child of a LocalPlatform (controller, runners, balancer, broker, job workers) is
a `Child` with an explicit state:

    RUNNING --exits--> BACKOFF --delay over (none after a long run)--> RUNNING
                          |
                          +-- max_fast_failures exits in a row, each within
                              min_uptime of its start --> FATAL (given up, loudly)

A child that dies after running for min_uptime is started again at once; one that
dies sooner after its start is started again after an exponential backoff (0.5 s, 1,
2, 4... up to backoff_max); the others keep serving meanwhile. Each death and restart is
said in the output: what died, its pid and exit status, when, and when it comes
back. Nothing here blocks: `step()` polls the children's Popen objects and restarts
what is due, and the caller (`berth up`'s loop) calls it a few times a second.
Stopping stays LocalPlatform.stop's (SIGTERM to each child by PID, SIGKILL after a
grace); the caller stops calling `step()` first.
"""
from __future__ import annotations

import enum
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cli.localplatform import LocalPlatform

log = logging.getLogger(__name__)


class ChildState(enum.Enum):
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


@dataclass
class Policy:
    first_delay: float = 0.5        # seconds before the first restart after a fast failure
    backoff_max: float = 30.0
    min_uptime: float = 10.0        # a child up this long did not fail "fast"
    max_fast_failures: int = 5      # fast failures in a row before giving up


@dataclass
class Child:
    name: str
    started_at: float
    pid: int
    state: ChildState = ChildState.RUNNING
    fast_failures: int = 0          # exits within min_uptime of a start, in a row
    restarts: int = 0
    retry_at: float = 0.0


def exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Supervisor:
    platform: LocalPlatform
    say: Callable[[str], None]              # a progress line
    shout: Callable[[str], None]            # a line nobody may miss (giving up)
    policy: Policy = field(default_factory=Policy)
    clock: Callable[[], float] = time.monotonic
    children: dict[str, Child] = field(default_factory=dict)

    def step(self) -> bool:
        """Notice deaths, restart what is due. True when something changed."""
        now = self.clock()
        changed = False
        for name, proc in list(self.platform.procs.items()):
            child = self.children.get(name)
            if child is None or child.pid != proc.pid:
                # new to us (started by the platform itself): supervised from now
                child = self.children[name] = Child(name, now, proc.pid)
            if child.state is ChildState.RUNNING:
                code = proc.poll()
                if code is not None:
                    self._died(child, code, now)
                    changed = True
            if child.state is ChildState.BACKOFF and now >= child.retry_at:
                self._restart(child, now)
                changed = True
        return changed

    def _died(self, child: Child, code: int | None, now: float, why: str = "") -> None:
        uptime = now - child.started_at
        fast = uptime < self.policy.min_uptime
        child.fast_failures = child.fast_failures + 1 if fast else 0
        at = time.strftime("%H:%M:%S")
        what = why or f"{child.name} (pid {child.pid}) {exit_text(code)} at {at}, " \
                      f"after {uptime:.1f}s up"
        log.warning("%s", what, extra={"child": child.name, "code": code})
        if child.fast_failures >= self.policy.max_fast_failures:
            child.state = ChildState.FATAL
            tail = self.platform.log_tail(child.name, 10)
            self.shout(f"{what}. It failed {child.fast_failures} times in a row within "
                       f"{self.policy.min_uptime:g}s of starting: GAVE UP on {child.name}; "
                       f"the rest of the platform keeps running without it.\n"
                       f"Last lines of {self.platform.data_dir / 'logs' / child.name}.log:"
                       f"\n{tail}\nFix the cause, then stop and start `berth up` again.")
            return
        delay = 0.0 if not fast else min(
            self.policy.backoff_max, self.policy.first_delay * 2 ** (child.fast_failures - 1))
        child.state, child.retry_at = ChildState.BACKOFF, now + delay
        self.say(f"{what}; restarting it " + (f"in {delay:g}s" if delay else "now"))

    def _restart(self, child: Child, now: float) -> None:
        try:
            proc = self.platform.respawn(child.name)
        except OSError as exc:
            child.started_at = now
            self._died(child, None, now, f"{child.name} could not be started: {exc}")
            return
        child.state, child.pid, child.started_at = ChildState.RUNNING, proc.pid, now
        child.restarts += 1
        self.say(f"{child.name} restarted (pid {proc.pid}, restart {child.restarts}) at "
                 f"{time.strftime('%H:%M:%S')}")

    def states(self) -> dict[str, ChildState]:
        return {name: child.state for name, child in self.children.items()}
