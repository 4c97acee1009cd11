"""One-off runs on a real runner process against a stand-in controller: the `run`
command on control, the streams on the attach channel (real ZeroMQ sockets), a real
slug, venv, jail (as root: the app's own user, bwrap, its own cgroup) and pty.

One runner serves the module, so the app's venv is made once.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from messaging.channels import bind
from messaging.envelope import Message, make, pack_bytes, recv, send, unpack_bytes
from messaging.messages import RUN_CHUNK, RUN_WINDOW
from tests.integration.test_runner import (
    BUILD_TIMEOUT,
    STEP_TIMEOUT,
    FakeController,
    RunnerProcess,
    SlugServer,
    kill_leftovers,
    make_slug,
)

PROMPT_PY = b"""\
name = input("name? ")
print(f"hello {name}!")
"""

WINCH_PY = b"""\
import os, signal, sys, time

def size():
    return "%dx%d" % tuple(os.get_terminal_size()) if sys.stdout.isatty() else "-"

signal.signal(signal.SIGWINCH, lambda *_: print("size " + size(), flush=True))
print("ready " + size(), flush=True)
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(7)
"""

SLUG = make_slug({"prompt.py": PROMPT_PY, "winch.py": WINCH_PY,
                  "requirements.txt": b"", "Procfile": b"web: python -m http.server\n"})
SHA = hashlib.sha256(SLUG).hexdigest()
APP = "oneoff"


class RunController(FakeController):
    """The fake controller plus the attach ROUTER, collecting each run's streams."""

    def __init__(self) -> None:
        super().__init__()
        self.attach = bind(self.ctx, "attach", "tcp://127.0.0.1:*")
        self.attach_endpoint = self.attach.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.out: dict[str, dict[str, bytearray]] = {}
        self.exits: dict[str, Message] = {}
        self.started: dict[str, Message] = {}
        self.acked_in: dict[str, int] = {}
        self.auto_ack = True

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            super().pump(0.01)          # control and logs
            while self.attach.poll(0):
                self._on_attach(*recv(self.attach))
            if time.monotonic() >= deadline:
                return

    def _on_attach(self, identity: bytes | None, msg: Message) -> None:
        run = msg["run"]
        if msg.type == "run_output":
            data = unpack_bytes(msg["data"])
            self.out.setdefault(run, {}).setdefault(msg["stream"], bytearray()).extend(data)
            if self.auto_ack:
                self.to_runner(make("run_ack", "controller", run=run, bytes=len(data)))
        elif msg.type == "run_exit":
            self.exits[run] = msg
        elif msg.type == "run_started":
            self.started[run] = msg
        elif msg.type == "run_ack":
            self.acked_in[run] = self.acked_in.get(run, 0) + msg["bytes"]

    def to_runner(self, msg: Message) -> None:
        assert self.runner_identity is not None
        send(self.attach, msg, self.runner_identity)

    def output(self, run: str, stream: str = "tty") -> str:
        return self.out.get(run, {}).get(stream, bytearray()).decode(errors="replace")

    def start(self, run: str, command: str, **args: Any) -> None:
        msg_id = self.command("run", run=run, app=APP, release=1, command=command,
                              env={"GREETING": "hi"}, slug=SHA,
                              slug_url=self.slugs.slug_url(SHA), **args)
        rep = self.reply(msg_id)
        assert rep["ok"] and rep["result"]["accepted"] is True, rep

    def type_in(self, run: str, data: bytes, eof: bool = False) -> None:
        self.to_runner(make("run_input", "controller", run=run, data=pack_bytes(data),
                            eof=eof))

    def wait_output(self, run: str, needle: str, stream: str = "tty",
                    timeout: float = STEP_TIMEOUT) -> str:
        return self.wait_for(f"{needle!r} in {run}'s {stream}",
                             lambda: needle in self.output(run, stream)
                             and self.output(run, stream), timeout)

    def wait_exit(self, run: str, timeout: float = STEP_TIMEOUT) -> Message:
        return self.wait_for(f"{run} to exit", lambda: self.exits.get(run), timeout)

    def close(self) -> None:
        self.attach.close(0)
        super().close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path, berth_root: Path
        ) -> Iterator[tuple[RunController, RunnerProcess]]:
    from tests.conftest import forget_apps, new_apps_dir
    apps = new_apps_dir(berth_root)
    ctl = RunController()
    ctl.slugs = SlugServer({SHA: SLUG})
    runner = RunnerProcess(tmp_path_factory.mktemp("runs"), ctl, ctl.slugs, venv_cache,
                           apps_dir=apps, attach_endpoint=ctl.attach_endpoint)
    try:
        # the first run of the module makes the venv
        ctl.start("warm", "true")
        ctl.wait_exit("warm", BUILD_TIMEOUT)
        yield ctl, runner
    finally:
        code = runner.terminate()
        if code != 0:
            kill_leftovers(ctl.pids)
            print(runner.log_text()[-5000:])
        runner.stderr.close()
        ctl.slugs.close()
        ctl.close()
        forget_apps(apps)


def test_a_tty_run_prompts_echoes_and_answers(rig: Any) -> None:
    ctl, _ = rig
    started = time.monotonic()
    ctl.start("tty1", "python prompt.py", tty=True, cols=100, rows=30)
    ctl.wait_output("tty1", "name? ")
    print(f"tty run start to prompt, warm venv: {time.monotonic() - started:.3f}s")
    ctl.type_in("tty1", b"bob\r")
    out = ctl.wait_output("tty1", "hello bob!")
    assert "name? bob\r\n" in out           # the remote terminal echoed the keys
    assert ctl.wait_exit("tty1")["code"] == 0
    assert ctl.acked_in["tty1"] == 4
    assert ctl.started["tty1"]["pid"] > 0


def test_resize_reaches_the_command_and_ctrl_c_its_foreground_group(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("tty2", "python winch.py", tty=True, cols=100, rows=30)
    ctl.wait_output("tty2", "ready 100x30")
    ctl.to_runner(make("run_resize", "controller", run="tty2", cols=132, rows=43))
    ctl.wait_output("tty2", "size 132x43")
    ctl.type_in("tty2", b"\x03")             # ^C, as a terminal in raw mode sends it
    ctl.wait_output("tty2", "interrupted")
    assert ctl.wait_exit("tty2")["code"] == 7


def test_a_shell_has_job_control_and_its_exit_code_is_the_runs(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("tty3", "bash --norc --noprofile -i", tty=True)
    ctl.type_in("tty3", b"stty size; echo $GREETING $BERTH_RUN\r")
    ctl.wait_output("tty3", "24 80")
    ctl.wait_output("tty3", "hi tty3")
    ctl.type_in("tty3", b"sleep 30\r")
    time.sleep(0.5)
    ctl.type_in("tty3", b"\x03")             # ends sleep, not the shell
    ctl.type_in("tty3", b"echo after=$?\r")
    ctl.wait_output("tty3", "after=130")
    ctl.type_in("tty3", b"exit 3\r")
    assert ctl.wait_exit("tty3")["code"] == 3


def test_pipes_keep_streams_apart_and_pass_stdin_eof(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("pipe1", "tr a-z A-Z; echo oops >&2; exit 5")
    ctl.type_in("pipe1", b"some input\n")
    ctl.type_in("pipe1", b"more", eof=True)
    code = ctl.wait_exit("pipe1")["code"]
    assert ctl.output("pipe1", "stdout") == "SOME INPUT\nMORE"
    assert ctl.output("pipe1", "stderr") == "oops\n"
    assert code == 5


def test_a_signal_to_a_run_without_a_terminal(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("pipe2", "python winch.py")
    ctl.wait_output("pipe2", "ready -", "stdout")
    ctl.to_runner(make("run_signal", "controller", run="pipe2", signal="INT"))
    ctl.wait_output("pipe2", "interrupted", "stdout")
    assert ctl.wait_exit("pipe2")["code"] == 7


def test_a_run_is_the_apps_user_in_its_jail(rig: Any) -> None:
    ctl, runner = rig
    ctl.start("who", "id -u; id -g; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
                     "touch $BERTH_DATA_DIR/ok && echo wrote; touch /etc/x || echo ro; "
                     "grep -q run-who /proc/self/cgroup && echo own-cgroup")
    assert ctl.wait_exit("who")["code"] == 0
    lines = ctl.output("who", "stdout").splitlines()
    uid = int(lines[0])
    if os.geteuid() == 0:
        assert uid >= 200000
        assert pwd.getpwuid(uid).pw_dir.endswith(f"{APP}/data")
        assert lines[2].startswith("bwrap")     # its own pid namespace
        assert lines[3:] == ["wrote", "ro", "own-cgroup"]    # limits as instances


def test_end_hangs_up_then_kills(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("end1", "trap 'echo got HUP; exit 9' HUP; sleep 60 & wait", tty=True)
    time.sleep(1.0)
    ctl.to_runner(make("run_end", "controller", run="end1", reason="client went away"))
    msg = ctl.wait_exit("end1", 10)
    assert msg["code"] == 9 and "client went away" in msg["reason"]
    # one that ignores the hang-up is killed after the grace (5 s here)
    ctl.start("end2", "trap '' HUP; sleep 60")
    time.sleep(1.0)
    t0 = time.monotonic()
    ctl.to_runner(make("run_end", "controller", run="end2"))
    msg = ctl.wait_exit("end2", 20)
    assert msg["code"] == 128 + 9 and 4 < time.monotonic() - t0 < 10


def test_a_run_past_its_timeout_is_ended(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("slow", "sleep 60", timeout=1)
    msg = ctl.wait_exit("slow", 15)
    assert "longer than its limit of 1s" in msg["reason"] and msg["code"] == 129


def test_output_waits_for_the_window(rig: Any) -> None:
    ctl, _ = rig
    size = 4 * RUN_WINDOW
    ctl.auto_ack = False
    try:
        ctl.start("flood", f"head -c {size} /dev/zero; echo done >&2")
        ctl.pump(3.0)
        got = len(ctl.out.get("flood", {}).get("stdout", b""))
        assert 0 < got <= RUN_WINDOW + RUN_CHUNK
        assert "flood" not in ctl.exits              # the command waits to write
    finally:
        ctl.auto_ack = True
    ctl.to_runner(make("run_ack", "controller", run="flood", bytes=got))
    ctl.wait_for("the rest", lambda: "flood" in ctl.exits, STEP_TIMEOUT)
    assert len(ctl.out["flood"]["stdout"]) == size
    assert ctl.exits["flood"]["code"] == 0


def test_a_detached_run_writes_to_the_logs_and_shows_in_heartbeats(rig: Any) -> None:
    ctl, _ = rig
    ctl.start("bg1", "echo start; sleep 2; echo finish >&2", detach=True)
    ctl.wait_for("bg1 in a heartbeat", lambda: any(
        r["run"] == "bg1" and r["state"] == "RUNNING" and r["detach"]
        for r in ctl.heartbeats[-1].get("runs", [])), STEP_TIMEOUT)
    assert ctl.wait_exit("bg1", 20)["code"] == 0
    lines = [(m["proc"], m.get("stream"), m["line"]) for m in ctl.log_lines
             if m.get("instance") == "bg1"]
    assert ("run.bg1", "stdout", "start") in lines
    assert ("run.bg1", "stderr", "finish") in lines
    platform = [line for proc, _, line in lines if proc == "platform"]
    assert platform[-1] == "run.bg1 exited with code 0", platform
    assert "run.bg1" not in str([r["run"] for r in ctl.heartbeats[-1].get("runs", [])])


def test_a_restarted_runner_ends_the_runs_a_killed_one_left(
        tmp_path: Path, venv_cache: Path, berth_root: Path) -> None:
    """kill -9 of the runner leaves a run's processes running (own session, own pid
    namespace); the next start of the runner on the same data dir ends them."""
    from tests.conftest import forget_apps, new_apps_dir
    from tests.integration.test_runner import alive
    apps = new_apps_dir(berth_root)
    ctl = RunController()
    ctl.slugs = SlugServer({SHA: SLUG})
    runner = RunnerProcess(tmp_path, ctl, ctl.slugs, venv_cache, apps_dir=apps,
                           attach_endpoint=ctl.attach_endpoint)
    again: RunnerProcess | None = None
    try:
        ctl.start("left", "echo $$; sleep 300", tty=True)
        pid_line = ctl.wait_for("the run's shell pid", lambda: re.search(
            r"^(\d+)\r$", ctl.output("left"), re.M), BUILD_TIMEOUT)
        ctl.wait_for("the run in a heartbeat", lambda: any(
            r["run"] == "left" for r in ctl.heartbeats[-1].get("runs", [])), STEP_TIMEOUT)
        outer = ctl.started["left"]["pid"]
        ctl.pids.add(outer)
        runner.proc.kill()
        runner.proc.wait(10)
        assert alive(outer), pid_line.group(1)         # orphaned, still running
        again = RunnerProcess(tmp_path, ctl, ctl.slugs, venv_cache, apps_dir=apps,
                              attach_endpoint=ctl.attach_endpoint)
        ctl.heartbeats.clear()
        ctl.wait_for("a heartbeat from the new runner", lambda: ctl.heartbeats, STEP_TIMEOUT)
        assert not alive(outer)
        assert ctl.heartbeats[-1].get("runs") == []
        assert "ended a leftover instance" in again.log_text() and "run-left" in \
            again.log_text()
    finally:
        for proc in (again, runner):
            if proc is not None:
                proc.terminate()
                proc.stderr.close()
        kill_leftovers(ctl.pids)
        ctl.slugs.close()
        ctl.close()
        forget_apps(apps)


def test_a_run_has_the_apps_memory_limit(rig: Any) -> None:
    ctl, _ = rig
    if os.geteuid() != 0:
        pytest.skip("cgroup limits need root")
    ctl.start("hog", "python -c 'b = bytearray(300 << 20); print(len(b))'",
              limits={"memory_mb": 64, "pids_max": None})
    msg = ctl.wait_exit("hog")
    assert msg["code"] == 128 + 9, (msg.fields, ctl.output("hog", "stderr"))
    ctl.start("fits", "python -c 'b = bytearray(16 << 20); print(len(b))'",
              limits={"memory_mb": 64, "pids_max": None})
    assert ctl.wait_exit("fits")["code"] == 0
