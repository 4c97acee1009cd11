"""Commands and builds as explicit state: every command ends exactly once, by reply,
timeout or a lost runner; builds move only along their declared transitions."""
from __future__ import annotations

import pytest

from controller.builds import LOG_CATCH_UP, Build, Builds, BuildState, BuildTransitionError
from controller.commands import Commands
from messaging.envelope import Message, make, reply
from messaging.errors import BerthError


class Wire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def __call__(self, host: str, msg: Message) -> None:
        self.sent.append((host, msg))


def table() -> tuple[Commands, Wire, list[tuple[str, object]]]:
    wire = Wire()
    seen: list[tuple[str, object]] = []
    cmds = Commands("controller", wire)
    return cmds, wire, seen


def send_stop(cmds: Commands, seen: list, host: str = "r1", now: float = 0.0):
    return cmds.send(host, "stop", {"instance": "i1"}, subject="i1", now=now, timeout=5.0,
                     on_result=lambda c, r: seen.append(("result", r)),
                     on_error=lambda c, e, b: seen.append(("error", e)))


def test_a_reply_runs_on_result_once_and_a_second_reply_is_dropped():
    cmds, wire, seen = table()
    cmd = send_stop(cmds, seen)
    (host, msg), = wire.sent
    assert host == "r1" and msg["action"] == "stop" and msg.id == cmd.id
    answer = reply(msg, "r1", result={"stopping": True})
    assert cmds.answered(answer) is cmd
    assert cmds.answered(answer) is None
    assert seen == [("result", {"stopping": True})] and not cmds.in_flight


def test_an_error_reply_becomes_a_berth_error_with_the_runners_hint():
    cmds, wire, seen = table()
    send_stop(cmds, seen)
    err = BerthError("busy", "send start again", code="busy")
    cmds.answered(reply(wire.sent[0][1], "r1", error=err.to_dict()))
    (kind, got), = seen
    assert kind == "error" and isinstance(got, BerthError)
    assert (got.code, got.message, got.hint) == ("busy", "busy", "send start again")


def test_deadline_and_lost_runner_each_end_a_command_once():
    cmds, wire, seen = table()
    send_stop(cmds, seen, "r1", now=0.0)
    send_stop(cmds, seen, "r2", now=0.0)
    cmds.expire(4.0)
    assert seen == []
    cmds.host_lost("r2")
    assert [(k, e.code) for k, e in seen] == [("error", "runner_lost")]
    cmds.expire(5.1)
    cmds.expire(6.0)
    assert [(k, e.code) for k, e in seen] == [("error", "runner_lost"), ("error", "timeout")]
    assert "r1" in seen[1][1].message and seen[1][1].hint
    # a reply after the deadline changes nothing
    assert cmds.answered(reply(wire.sent[0][1], "r1", result={})) is None
    assert len(seen) == 2


def test_build_walks_queued_preparing_catching_up_succeeded():
    b = Build("b1", queued_at=0.0)
    b.dispatched("r1", 1.0)
    assert b.state is BuildState.PREPARING and b.host == "r1"
    b.answered(2.0, log_lines=2, result={"reused": True})
    assert b.state is BuildState.CATCHING_UP and not b.caught_up(2.1)
    b.lines_received = 2
    assert b.caught_up(2.1)
    b.finish()
    assert b.state is BuildState.SUCCEEDED and b.done


def test_catch_up_gives_up_waiting_for_lines_at_its_deadline_and_a_failed_reply_fails():
    b = Build("b1", queued_at=0.0)
    b.dispatched("r1", 1.0)
    b.answered(2.0, log_lines=10, error=BerthError("pip failed", "fix requirements"))
    assert not b.caught_up(2.0 + LOG_CATCH_UP - 0.1)
    assert b.caught_up(2.0 + LOG_CATCH_UP)
    b.finish()
    assert b.state is BuildState.FAILED and b.error and b.error.message == "pip failed"


def test_builds_cannot_skip_or_reverse_states():
    b = Build("b1", queued_at=0.0)
    with pytest.raises(BuildTransitionError):
        b.answered(1.0, 0, result={})          # never dispatched
    b.fail(BerthError("no runner"))
    with pytest.raises(BuildTransitionError):
        b.dispatched("r1", 2.0)                 # a failed build stays failed


def test_builds_table_takes_submissions_counts_lines_and_forgets_finished():
    builds = Builds()
    builds.submit("b1")
    builds.submit("b2")
    builds.take_new(0.0)
    assert [b.id for b in builds.in_state(BuildState.QUEUED)] == ["b1", "b2"]
    builds.line("b1")
    builds.line("nope")                          # a line for an unknown build is ignored
    assert builds.active["b1"].lines_received == 1
    builds.active["b2"].fail(BerthError("x"))
    builds.forget_done()
    assert list(builds.active) == ["b1"]


def test_commands_are_checked_against_the_declared_actions():
    cmds, wire, seen = table()
    with pytest.raises(BerthError, match="lacks args"):
        cmds.send("r1", "start", {"instance": "i"}, subject="i", now=0.0)
    assert not wire.sent and not cmds.in_flight
    assert make("heartbeat", "c", host="c", interval=1.0).type == "heartbeat"


def test_release_phase_sits_between_a_good_build_and_its_release():
    b = Build("b1", queued_at=0.0)
    b.dispatched("r1", 1.0)
    b.answered(2.0, log_lines=0, result={})
    b.releasing("run1")
    assert b.state is BuildState.RELEASING and not b.done and b.release_run == "run1"
    b.released()
    assert b.state is BuildState.SUCCEEDED
    failed = Build("b2", queued_at=0.0)
    failed.dispatched("r1", 1.0)
    failed.answered(2.0, log_lines=0, result={})
    failed.releasing("run2")
    failed.fail(BerthError("the release command exited with code 1"))
    assert failed.state is BuildState.FAILED
    with pytest.raises(BuildTransitionError):
        Build("b3", queued_at=0.0).releasing("run3")     # only a good build releases


def test_line_splitter_keeps_partial_lines_until_they_end():
    from controller.runs import LineSplitter
    got: list[str] = []
    s = LineSplitter(got.append, max_line=10)
    s.feed(b"one\r\ntw")
    s.feed(b"o\nthree")
    assert got == ["one", "two"]
    s.feed(b"-and-a-very-long-tail")
    s.close()
    assert got[2:] == ["three-and-a-very-long-tail"]
