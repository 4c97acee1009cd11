"""One-off runs on the controller: the state machine, the client Attachment (its input
window, coalescing, final frame) and the loop's side (placement, pumping, ends,
lost runners) against a stand-in controller."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from controller.commands import Commands
from controller.runloop import RunLoop
from controller.runs import (
    ATTACH_WAIT,
    LOST_AFTER,
    Attachment,
    Callbacks,
    Run,
    RunState,
    RunTransitionError,
)
from messaging import runframes
from messaging.envelope import Message, make, pack_bytes, reply, unpack_bytes
from messaging.errors import BerthError
from messaging.manifest import Manifest
from messaging.messages import RUN_WINDOW
from messaging.shapes import HostReport, InventoryItem, RunItem, State


def a_run(**kw: Any) -> Run:
    return Run(id=kw.pop("id", "ab12cd34"), app="a", release=2, slug="s" * 64,
               command="bash", env={}, sink=kw.pop("sink", Callbacks()), **kw)


def test_runs_move_only_along_their_transitions():
    run = a_run()
    with pytest.raises(RunTransitionError):
        run.exited(0.0, 0, "")               # QUEUED cannot exit
    run.sent("r1", 1.0)
    run.started(2.0)
    assert run.state is RunState.RUNNING and run.started_at == 2.0
    run.exited(3.0, 3, "exited with code 3")
    assert run.done and run.code == 3
    with pytest.raises(RunTransitionError):
        run.exited(4.0, 0, "")


def test_attachment_input_waits_for_the_window_and_is_coalesced():
    att = Attachment()
    att.client_sent(runframes.STDIN, b"a" * (RUN_WINDOW - 1))
    att.client_sent(runframes.RESIZE, runframes.resize(100, 40)[5:])
    att.client_sent(runframes.STDIN, b"b")          # the window is full after this one
    blocked = threading.Thread(target=att.client_sent, args=(runframes.STDIN, b"c"))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()                       # waits: nothing acknowledged
    events = att.take_input()
    assert [e.kind for e in events] == [runframes.STDIN, runframes.RESIZE, runframes.STDIN]
    assert (events[1].cols, events[1].rows) == (100, 40)
    att.input_acked(RUN_WINDOW)
    blocked.join(2)
    assert not blocked.is_alive()
    att.client_sent(runframes.STDIN, b"d")
    assert [e.data for e in att.take_input()] == [b"cd"]


def test_attachment_frames_end_with_exit_or_error():
    att = Attachment()
    att.output("tty", b"hi")
    att.output("stderr", b"oops")
    run = a_run(sink=att)
    run.sent("r1", 0.0)
    run.fail(1.0, BerthError("no", "try"))
    att.ended(run)
    frames = [att.next_frame(0.1) for _ in range(3)]
    assert [f[0][:1] for f in frames if f] == [runframes.OUTPUT, runframes.STDERR,
                                               runframes.ERROR]
    assert frames[0][1] == 2 and frames[2][2] is True
    assert att.finished.is_set()
    assert att.claim() and not att.claim()          # one client per run


class FakeController:
    def __init__(self) -> None:
        self.settings = SimpleNamespace(host_id="controller", run_max_seconds=3600.0,
                                        run_detached_max_seconds=86400.0,
                                        base_domain="localhost")
        self.sent: list[tuple[str, Message]] = []
        self.commands = Commands("controller", lambda h, m: self.sent.append((h, m)))
        self.reports: dict[str, HostReport] = {}
        self.store = SimpleNamespace(
            require_app=lambda app: None,
            current_release=lambda app: SimpleNamespace(
                version=2, slug="s" * 64, config={"K": "v"},
                manifest=Manifest(memory_mb=128, env_aliases={"K2": "K"})),
            limits=lambda app: {"memory_mb": None, "pids_max": None},
            domains=lambda app: {app: ["www.example.com"]})

    def observed(self, now: float | None = None) -> dict[str, HostReport]:
        return self.reports

    def slug_url(self, sha: str) -> str:
        return f"http://c/v1/slugs/{sha}"


def loop() -> tuple[RunLoop, FakeController, list[tuple[str, Message]]]:
    c = FakeController()
    attach: list[tuple[str, Message]] = []
    return RunLoop(c, lambda h, m: attach.append((h, m)), lambda: None), c, attach


def test_a_run_goes_to_a_host_running_its_release_and_its_client_is_pumped():
    rl, c, attach = loop()
    c.reports = {
        "idle": HostReport("idle"),
        "warm": HostReport("warm", inventory=[
            InventoryItem(instance="w1", app="a", release=2, proc="web",
                          state=State.RUNNING)]),
    }
    att = Attachment()
    run = rl.start("a", "python manage.py migrate", tty=True, cols=90, rows=20, sink=att)
    # what its instances get: config, aliases, host names; the manifest's memory limit
    assert run.env == {"K": "v", "K2": "v", "BERTH_HOSTNAMES": "a.localhost,www.example.com"}
    assert run.timeout == 3600.0
    rl.step(0.0)
    (host, cmd), = c.sent
    assert host == "warm" and cmd["action"] == "run"
    assert cmd["args"]["limits"] == {"memory_mb": 128, "pids_max": None}
    assert cmd["args"]["manifest"]["memory_mb"] == 128
    assert (cmd["args"]["tty"], cmd["args"]["cols"], cmd["args"]["rows"]) == (True, 90, 20)
    c.commands.answered(reply(cmd, "warm", result={"accepted": True}))
    assert run.state is RunState.STARTING and att.claim()

    rl.on_message(make("run_started", "warm", run=run.id, pid=7), 0.1)
    rl.on_message(make("run_output", "warm", run=run.id, data=pack_bytes(b"$ "),
                       stream="tty"), 0.1)
    frame, n, _ = att.next_frame(0.1) or (b"", 0, False)
    assert frame == runframes.frame(runframes.OUTPUT, b"$ ")
    att.sent(n)
    att.client_sent(runframes.STDIN, b"ls\r")
    att.client_sent(runframes.SIGNAL, b"INT")
    c.reports["warm"].runs = [RunItem(run=run.id, app="a", release=2, command="x",
                                      state=State.RUNNING)]
    rl.step(0.2)
    kinds = [(m.type, m.fields) for _, m in attach]
    assert ("run_ack", {"run": run.id, "bytes": 2}) in kinds
    inputs = [m for _, m in attach if m.type == "run_input"]
    assert unpack_bytes(inputs[0]["data"]) == b"ls\r" and run.input_in_flight == 3
    assert any(m.type == "run_signal" and m["signal"] == "INT" for _, m in attach)

    rl.on_message(make("run_exit", "warm", run=run.id, code=3, reason="exited with code 3"),
                  0.3)
    assert run.state is RunState.EXITED and att.finished.is_set()


def test_a_client_that_leaves_or_never_comes_ends_the_run():
    rl, c, attach = loop()
    c.reports = {"r1": HostReport("r1")}
    gone, never = Attachment(), Attachment()
    r1 = rl.start("a", "bash", sink=gone)
    r2 = rl.start("a", "bash", sink=never)
    rl.step(0.0)
    gone.claim()
    gone.hang_up()
    rl.step(1.0)
    assert [m["run"] for _, m in attach if m.type == "run_end"] == [r1.id]
    rl.step(ATTACH_WAIT + 1)
    assert [m["run"] for _, m in attach if m.type == "run_end"] == [r1.id, r2.id]


def test_lost_runs_fail_and_strays_are_ended():
    rl, c, attach = loop()
    c.reports = {"r1": HostReport("r1")}
    ended: list[Run] = []
    run = rl.start("a", "sleep 100", on_exit=ended.append)
    rl.step(0.0)
    rl.on_message(make("run_started", "r1", run=run.id), 0.0)
    rl.step(LOST_AFTER + 1)                 # never listed in a heartbeat
    assert run.state is RunState.FAILED and ended == [run]
    assert run.error is not None and run.error.code == "run_lost"

    c.reports["r1"].runs = [RunItem(run="feed0001", app="a", release=1, command="x",
                                    state=State.RUNNING),
                            RunItem(run="feed0002", app="a", release=1, command="x",
                                    state=State.RUNNING, detach=True)]
    rl.step(20.0)
    assert [m["run"] for _, m in attach if m.type == "run_end"] == ["feed0001"]
    rl.step(21.0)                           # not again at once
    assert len([m for _, m in attach if m.type == "run_end"]) == 1


def test_no_runner_fails_the_run():
    rl, c, _ = loop()
    att = Attachment()
    run = rl.start("a", "true", sink=att)
    rl.step(0.0)
    rl.step(100.0)
    assert run.state is RunState.FAILED and run.error is not None
    assert run.error.code == "no_runner"
