"""berth up's supervisor (cli/supervisor.py) over real short-lived processes, with a
clock the test moves."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.supervisor import ChildState, Policy, Supervisor, exit_text


class FakePlatform:
    """What the supervisor uses of a LocalPlatform: procs, respawn, log_tail."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        self.commands[name] = command
        return self.respawn(name)

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.commands[name], start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        return f"(the end of {name}'s log)"


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FakePlatform, Supervisor, list[str], list[str]]]:
    platform = FakePlatform(tmp_path)
    said: list[str] = []
    shouted: list[str] = []
    sup = Supervisor(platform, said.append, shouted.append,  # type: ignore[arg-type]
                     Policy(first_delay=0.5, min_uptime=10, max_fast_failures=3),
                     clock=Clock())
    yield platform, sup, said, shouted
    for proc in platform.procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def settle(proc: subprocess.Popen[bytes]) -> None:
    proc.wait(5)


def test_exit_text() -> None:
    assert exit_text(-9) == "was killed by SIGKILL"
    assert exit_text(3) == "exited with code 3"


def test_a_dead_child_is_restarted_after_a_backoff_and_the_others_keep_running(
        setup: Any) -> None:
    platform, sup, said, shouted = setup
    runner = platform.start("runner-1", ["sleep", "30"])
    other = platform.start("balancer-1", ["sleep", "30"])
    assert not sup.step()
    os.kill(runner.pid, signal.SIGKILL)
    settle(runner)
    sup.clock.now += 12                     # it had been up 12 s: not a fast failure
    assert sup.step()
    assert said[-2].startswith(f"runner-1 (pid {runner.pid}) was killed by SIGKILL at ")
    assert said[-2].endswith("after 12.0s up; restarting it now")
    again = platform.procs["runner-1"]
    assert again.pid != runner.pid and again.poll() is None
    assert said[-1].startswith(f"runner-1 restarted (pid {again.pid}, restart 1) at ")
    # dying again soon after its start: a fast failure, restarted after a delay
    os.kill(again.pid, signal.SIGKILL)
    settle(again)
    sup.clock.now += 1
    sup.step()
    assert said[-1].endswith("after 1.0s up; restarting it in 0.5s")
    assert sup.states()["runner-1"] is ChildState.BACKOFF
    sup.clock.now += 0.4
    sup.step()
    assert platform.procs["runner-1"] is again          # not yet
    sup.clock.now += 0.1
    sup.step()
    assert platform.procs["runner-1"].pid != again.pid
    assert said[-1].startswith("runner-1 restarted (pid ") and "restart 2" in said[-1]
    assert platform.procs["balancer-1"] is other and other.poll() is None
    assert not shouted


def test_fast_failures_back_off_longer_then_it_is_given_up_loudly(setup: Any) -> None:
    platform, sup, said, shouted = setup
    platform.start("controller", ["sh", "-c", "exit 3"])
    platform.start("runner-1", ["sleep", "30"])
    delays = []
    for _ in range(3):
        settle(platform.procs["controller"])
        sup.step()
        if sup.states()["controller"] is ChildState.FATAL:
            break
        delays.append(said[-1].rsplit(" ", 1)[1])
        sup.clock.now += 5
        sup.step()                          # restarted; exits at once again
    assert delays == ["0.5s", "1s"]
    assert sup.states()["controller"] is ChildState.FATAL
    assert len(shouted) == 1
    assert "controller" in shouted[0] and "exited with code 3" in shouted[0]
    assert "GAVE UP on controller" in shouted[0]
    assert "(the end of controller's log)" in shouted[0]
    sup.clock.now += 60
    sup.step()                              # given up: never started again
    assert sup.states()["controller"] is ChildState.FATAL
    assert sup.states()["runner-1"] is ChildState.RUNNING
