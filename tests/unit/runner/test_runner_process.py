"""The instance state machine, driven with real short-lived processes and a clock the
test moves forward (so backoff delays cost no real time)."""
from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from runner.process import (
    TRANSITIONS,
    Hooks,
    Instance,
    InstanceSpec,
    Policy,
    SpawnRequest,
    SpawnResult,
    State,
    TransitionError,
    backoff_delay,
    describe_exit,
    do_spawn,
)

PY = sys.executable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(Hooks):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.spawns = 0
        self.prepares = 0

    def spawned(self, inst: Instance) -> None:
        self.spawns += 1

    def prepare(self, inst: Instance) -> None:
        self.prepares += 1

    def event(self, inst: Instance, text: str) -> None:
        self.events.append(text)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def factory(command: str, proc: str = "worker", **policy: float) -> Instance:
        spec = InstanceSpec(instance=f"i{len(made)}", app="demo", release=1, proc=proc,
                            command=command, env={"GREETING": "hi"}, slug="s" * 64,
                            slug_url="http://x/")
        inst = Instance(spec, Policy(address="127.0.0.1", **policy),
                        tmp_path / "instances" / spec.instance, hooks=Recorder(),
                        clock=Clock())
        made.append(inst)
        return inst
    yield factory
    for inst in made:               # stop what the test started, by pid
        if inst.proc is not None:
            os.killpg(inst.proc.pid, signal.SIGKILL)
            inst.proc.wait(5)


def prepared(inst: Instance, tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    inst.prepared(tmp_path, tmp_path / "venv" / "bin", control_socket=False)


def tick_until(inst: Instance, state: State, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while inst.state is not state:
        assert time.monotonic() < deadline, f"still {inst.state} ({inst.reason})"
        inst.tick()
        time.sleep(0.02)


def read_line(stream: IO[bytes], timeout: float = 10.0) -> bytes:
    """One line from a child's stdout pipe, failing after `timeout` seconds rather
    than blocking for as long as the child lives."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return stream.readline()


def advance(inst: Instance, seconds: float) -> None:
    inst.clock.now += seconds  # type: ignore[attr-defined]


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff_delay(n, 30) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert backoff_delay(3, 5.5) == 5.5


def test_transition_table_is_closed() -> None:
    assert TRANSITIONS[State.STOPPED] == frozenset()
    assert TRANSITIONS[State.FATAL] == {State.STOPPED}
    assert TRANSITIONS[State.STOPPING] == {State.STOPPED}
    for targets in TRANSITIONS.values():
        assert targets <= set(State)


def test_an_undeclared_transition_is_refused(make: Callable[..., Instance]) -> None:
    inst = make("sleep 30")
    with pytest.raises(TransitionError):
        inst._transition(State.STOPPING, "no process to wait for")
    assert inst.state is State.PREPARING


def test_describe_exit() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_worker_settles_crashes_backs_off_and_restarts(make: Callable[..., Instance],
                                                      tmp_path: Path) -> None:
    inst = make("sleep 30")
    prepared(inst, tmp_path)
    assert inst.state is State.STARTING and inst.pid and inst.port is None
    inst.tick()
    assert inst.state is State.STARTING           # not up for 1 s yet
    advance(inst, 1.1)
    inst.tick()
    assert inst.state is State.RUNNING

    first = inst.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    tick_until(inst, State.BACKOFF)
    assert inst.restarts == 1 and inst.failures == 1 and inst.pid is None
    assert inst.reason == "killed by SIGKILL, restarting in 2s"
    advance(inst, 1.9)
    inst.tick()
    assert inst.state is State.BACKOFF
    advance(inst, 0.2)
    inst.tick()
    assert inst.state is State.STARTING and inst.pid not in (None, first)
    assert inst.hooks.spawns == 2  # type: ignore[attr-defined]
    assert inst.inventory().state is State.STARTING


def test_failures_are_forgiven_after_ten_seconds_running(make: Callable[..., Instance],
                                                        tmp_path: Path) -> None:
    inst = make("sleep 30")
    prepared(inst, tmp_path)
    inst.failures = 3
    advance(inst, 1.1)
    inst.tick()
    assert inst.state is State.RUNNING and inst.failures == 3
    advance(inst, 10)
    inst.tick()
    assert inst.failures == 0


def test_a_process_that_keeps_failing_goes_fatal(make: Callable[..., Instance],
                                                 tmp_path: Path) -> None:
    inst = make("sh -c 'exit 3'", start_retries=3)
    prepared(inst, tmp_path)
    delays = []
    for _ in range(2):
        tick_until(inst, State.BACKOFF)
        delays.append(inst.reason)
        advance(inst, 60)
        inst.tick()
    tick_until(inst, State.FATAL)
    assert delays == ["exited with code 3, restarting in 2s",
                      "exited with code 3, restarting in 4s"]
    assert inst.reason == "exited with code 3; gave up after 3 failed starts in a row"
    assert inst.restarts == 2 and inst.proc is None
    advance(inst, 600)
    inst.tick()
    assert inst.state is State.FATAL              # stays until commanded
    inst.stop()
    assert inst.state is State.STOPPED


def test_a_command_that_cannot_run_is_a_failed_start(make: Callable[..., Instance],
                                                     tmp_path: Path) -> None:
    inst = make("berth-no-such-program --flag")
    prepared(inst, tmp_path)
    tick_until(inst, State.BACKOFF)
    assert inst.restarts == 1
    assert inst.reason.startswith("exited with code 127: command not found")


def test_commanded_stop_is_not_a_crash(make: Callable[..., Instance],
                                       tmp_path: Path) -> None:
    inst = make("sleep 30")
    prepared(inst, tmp_path)
    inst.stop(grace=5)
    assert inst.state is State.STOPPING
    tick_until(inst, State.STOPPED)
    assert inst.restarts == 0 and inst.failures == 0
    assert inst.reason == "stopped (killed by SIGTERM)"


def test_stop_escalates_to_sigkill_after_the_grace(make: Callable[..., Instance],
                                                   tmp_path: Path) -> None:
    # says "term" on each SIGTERM and carries on (sleep resumes after the handler)
    inst = make(f"{PY} -c 'import signal, time; signal.signal(signal.SIGTERM, "
                "lambda *a: print(\"term\", flush=True)); print(\"ready\", flush=True); "
                "time.sleep(30)'")
    prepared(inst, tmp_path)
    assert inst.proc is not None and inst.proc.stdout is not None
    assert read_line(inst.proc.stdout) == b"ready\n"
    inst.stop(grace=3)
    assert read_line(inst.proc.stdout) == b"term\n"   # the SIGTERM arrived...
    inst.tick()
    assert inst.proc.poll() is None                 # ...and was survived
    assert inst.state is State.STOPPING             # grace not over: no SIGKILL yet
    advance(inst, 3)
    tick_until(inst, State.STOPPED)
    assert inst.reason == "stopped (killed by SIGKILL)"


def test_stop_without_a_process_is_immediate(make: Callable[..., Instance],
                                             tmp_path: Path) -> None:
    preparing = make("sleep 30")
    preparing.stop()
    assert preparing.state is State.STOPPED
    preparing.prepared(tmp_path, tmp_path, False)  # a late prepare result is ignored
    assert preparing.state is State.STOPPED and preparing.proc is None

    backing_off = make("sh -c 'exit 1'")
    prepared(backing_off, tmp_path)
    tick_until(backing_off, State.BACKOFF)
    backing_off.stop()
    assert backing_off.state is State.STOPPED


def test_web_health_timeout_kills_and_counts_a_failed_start(make: Callable[..., Instance],
                                                            tmp_path: Path) -> None:
    inst = make("sleep 30", proc="web", health_timeout=5)
    prepared(inst, tmp_path)
    assert inst.port is not None
    gen = inst.generation
    advance(inst, 5)
    tick_until(inst, State.BACKOFF)
    assert inst.reason == "did not answer HTTP within 5s, restarting in 2s"
    inst.healthy(gen)                             # a stale health result is ignored
    assert inst.state is State.BACKOFF


def test_web_becomes_running_when_healthy_and_gets_a_new_port_each_start(
        make: Callable[..., Instance], tmp_path: Path) -> None:
    inst = make("sleep 30", proc="web")
    prepared(inst, tmp_path)
    first_port = inst.port
    inst.healthy(inst.generation)
    assert inst.state is State.RUNNING
    assert inst.proc is not None
    os.killpg(inst.proc.pid, signal.SIGKILL)
    tick_until(inst, State.BACKOFF)
    advance(inst, 2)
    inst.tick()
    assert inst.state is State.STARTING and inst.port not in (None, first_port)


def test_prepare_failures(make: Callable[..., Instance]) -> None:
    build = make("sleep 30")
    build.prepare_failed("pip install -r requirements.txt failed", retry=False)
    assert build.state is State.FATAL

    fetch = make("sleep 30")
    fetch.prepare_failed("fetching slug failed", retry=True)
    assert fetch.state is State.BACKOFF and fetch.restarts == 0
    advance(fetch, 2)
    fetch.tick()
    assert fetch.state is State.PREPARING
    assert fetch.hooks.prepares == 1  # type: ignore[attr-defined]


def test_environment_and_args(make: Callable[..., Instance], tmp_path: Path) -> None:
    inst = make("gunicorn app:app --workers 2", proc="web")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "gunicorn").write_text("#!/bin/sh\n")
    inst.release_dir, inst.venv_bin, inst.port = tmp_path, venv_bin, 5000
    assert inst.args() == ["/bin/sh", "-c", "exec gunicorn app:app --workers 2"]
    env = inst.environment()
    assert env["PATH"] == f"{venv_bin}:/usr/local/bin:/usr/bin:/bin"   # the app's gunicorn
    assert env["HOME"] == str(tmp_path) and env["LANG"] == "C.UTF-8"
    assert env["PYTHONUNBUFFERED"] == "1" and env["GREETING"] == "hi"
    assert (env["BERTH_APP"], env["BERTH_RELEASE"], env["BERTH_INSTANCE"]) == \
        ("demo", "1", inst.id)
    assert env["PORT"] == "5000"
    assert env["GUNICORN_CMD_ARGS"] == "--bind 127.0.0.1:5000"
    inst.control_socket = True
    assert inst.environment()["GUNICORN_CMD_ARGS"] == \
        f"--bind 127.0.0.1:5000 --control-socket {inst.instance_dir / 'gunicorn.ctl'}"
    inst.instance_dir = tmp_path / ("x" * 120)
    assert len(inst.control_socket_path()) < 100


class Deferred(Recorder):
    """Spawns as the daemon does: the request is answered later (here: by the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[SpawnRequest] = []

    def spawn(self, inst: Instance, request: SpawnRequest) -> None:
        self.requests.append(request)


def deferred(make: Callable[..., Instance], command: str, **kw: float | str) -> Instance:
    inst = make(command, **kw)
    inst.hooks = Deferred()
    return inst


def answer(inst: Instance) -> SpawnResult:
    hooks = inst.hooks
    assert isinstance(hooks, Deferred)
    return do_spawn(inst.ops, hooks.requests.pop(0))


def test_a_spawn_in_flight_is_starting_without_a_process(make: Callable[..., Instance],
                                                         tmp_path: Path) -> None:
    inst = deferred(make, "sleep 30", proc="web")
    prepared(inst, tmp_path)
    assert inst.state is State.STARTING and inst.proc is None and inst.port
    request = inst.hooks.requests[0]       # type: ignore[attr-defined]
    assert request.env["PORT"] == str(inst.port) and request.generation == inst.generation
    advance(inst, 3600)
    inst.tick()                             # no health timeout before there is a process
    assert inst.state is State.STARTING and inst.inventory().pid is None
    inst.healthy(inst.generation)           # answered before the spawn was reported
    assert inst.spawn_done(answer(inst))
    assert inst.proc is not None and inst.state is State.RUNNING
    assert inst.reason.startswith("answering HTTP")
    assert not inst.spawn_done(SpawnResult(inst.generation))    # nobody awaits another


def test_a_stop_while_spawning_stops_the_process_once_it_exists(
        make: Callable[..., Instance], tmp_path: Path) -> None:
    inst = deferred(make, "sleep 30")
    prepared(inst, tmp_path)
    inst.stop(grace=5)
    assert inst.state is State.STOPPING and inst.proc is None
    inst.tick()
    assert inst.spawn_done(answer(inst))
    assert inst.proc is not None
    tick_until(inst, State.STOPPED)
    assert inst.reason == "stopped (killed by SIGTERM)" and inst.restarts == 0

    # past the grace by the time the process exists: SIGKILL at once
    late = deferred(make, "trap '' TERM; sleep 30")
    prepared(late, tmp_path)
    late.stop(grace=1)
    advance(late, 2)
    late.spawn_done(answer(late))
    tick_until(late, State.STOPPED)
    assert late.reason == "stopped (killed by SIGKILL)"


def test_a_failed_spawn_backs_off_or_stops(make: Callable[..., Instance],
                                          tmp_path: Path) -> None:
    inst = deferred(make, "sleep 30", proc="web")
    prepared(inst, tmp_path)
    assert inst.spawn_done(SpawnResult(inst.generation, error="no such file"))
    assert inst.state is State.BACKOFF and inst.port is None
    assert inst.reason == "cannot start `sleep 30`: no such file, restarting in 2s"

    stopped = deferred(make, "sleep 30")
    prepared(stopped, tmp_path)
    stopped.stop()
    assert stopped.spawn_done(SpawnResult(stopped.generation, error="fork failed"))
    assert stopped.state is State.STOPPED and stopped.reason == "stopped before it started"
