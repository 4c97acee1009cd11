"""One-off runs end to end (issue 8): the real `berth run` CLI, driven through a real
pseudo-terminal where it needs one, against a real controller, runner (127.0.0.2,
isolation on as root) and the app's real release, venv and user.
"""
from __future__ import annotations

import fcntl
import http.client
import json
import os
import pty
import pwd
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Berth, copy_example

PROMPT_PY = '''\
name = input("name? ")
print(f"hello {name}!")
'''

WINCH_PY = '''\
import os, signal, sys, time

def size():
    return "%dx%d" % tuple(os.get_terminal_size()) if sys.stdout.isatty() else "-"

signal.signal(signal.SIGWINCH, lambda *_: print("size " + size(), flush=True))
try:
    print("ready " + size(), flush=True)   # a ^C right after it is still caught
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(7)
'''

APP = "oneoff"
OTHER = "neighbour"
STEP = 60.0             # seconds any one wait may take


class Terminal:
    """The real `berth` CLI on the slave side of a pseudo-terminal (its controlling
    terminal, as in a login), driven from the master side like a person at a
    keyboard."""

    def __init__(self, berth: Berth, *args: str, cols: int = 100, rows: int = 30) -> None:
        env = {**berth.env, "TERM": "xterm"}
        argv = [sys.executable, "-m", "cli.main", *args]
        self.started = time.monotonic()
        pid, fd = pty.fork()
        if pid == 0:                                # the child: set the size, become berth
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.chdir(ROOT)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = b""
        self.status: int | None = None

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return
            try:
                data = os.read(self.fd, 65536)
            except OSError:                         # EIO: the CLI closed the terminal
                return
            if not data:
                return
            self.out += data

    def expect(self, needle: str, timeout: float = STEP) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, \
                f"timed out waiting for {needle!r}; the terminal shows:\n{self.text}"
            assert self.alive(), f"berth exited; the terminal shows:\n{self.text}"
            self.read(0.1)
        return self.text

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def resize(self, cols: int, rows: int) -> None:
        """As a terminal emulator does: the kernel sends the CLI SIGWINCH."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def cooked(self) -> bool:
        """The terminal's line discipline echoes and edits lines again."""
        lflag = termios.tcgetattr(self.fd)[3]
        return bool(lflag & termios.ECHO and lflag & termios.ICANON and lflag & termios.ISIG)

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is None

    def wait(self, timeout: float = STEP) -> int:
        deadline = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < deadline, f"berth still runs; terminal:\n{self.text}"
            self.read(0.1)
        self.read(0.2)
        assert self.status is not None
        return self.status

    def close(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture(scope="module")
def app(berth: Berth, tmp_path_factory: pytest.TempPathFactory) -> str:
    src = copy_example(tmp_path_factory.mktemp("run") / APP)
    (src / "prompt.py").write_text(PROMPT_PY)
    (src / "winch.py").write_text(WINCH_PY)
    berth("apps", "create", APP)
    berth("push", str(src), "-a", APP, timeout=600)
    berth("apps", "create", OTHER)
    berth("push", str(copy_example(tmp_path_factory.mktemp("run") / OTHER)), "-a", OTHER,
          timeout=600)
    return APP


@pytest.fixture
def terminal(berth: Berth):
    opened: list[Terminal] = []

    def open_(*args: str, **kw: Any) -> Terminal:
        term = Terminal(berth, *args, **kw)
        opened.append(term)
        return term
    yield open_
    for term in opened:
        term.close()


def runs(berth: Berth, app: str) -> list[dict[str, Any]]:
    return berth.json("ps", "-a", app).get("runs", [])


@pytest.mark.timeout(240)
def test_a_prompt_in_a_remote_terminal(berth: Berth, app: str, terminal: Any) -> None:
    term = terminal("run", "-a", app, "--", "python", "prompt.py")
    term.expect("name? ")
    assert not term.cooked()                        # raw while the run is attached
    print(f"berth run to the remote prompt: {time.monotonic() - term.started:.2f}s")
    term.type(b"bob\r")
    out = term.expect("hello bob!")
    assert "name? bob\r\n" in out                   # echoed by the remote terminal
    assert term.wait() == 0
    assert term.cooked()                            # the local terminal is restored


@pytest.mark.timeout(240)
def test_resize_and_ctrl_c_reach_the_remote_command(berth: Berth, app: str,
                                                    terminal: Any) -> None:
    term = terminal("run", "-a", app, "--", "python", "winch.py", cols=100, rows=30)
    term.expect("ready 100x30")
    term.resize(132, 43)
    term.expect("size 132x43")
    term.type(b"\x03")                              # the CLI's terminal is raw: a byte
    term.expect("interrupted")                      # the remote command's handler ran
    assert term.wait() == 7                         # ...and its exit code is berth's
    assert term.cooked()


@pytest.mark.timeout(240)
def test_a_shell_with_job_control_as_the_apps_user(berth: Berth, app: str,
                                                   terminal: Any) -> None:
    term = terminal("run", "-a", app, "bash")
    term.expect("$ ")                               # bash's prompt, as the app's user
    term.type(b"echo uid=$(id -u) app=$BERTH_APP\r")
    out = term.expect(f"app={app}")
    uid = int(re.findall(r"uid=(\d+) app=", out)[-1])
    assert uid >= 200000
    term.type(b"sleep 30\r")
    time.sleep(1.0)
    term.type(b"\x03")                              # ends sleep, not bash
    term.type(b"echo after=$?\r")
    term.expect("after=130")
    term.type(b"exit 3\r")
    assert term.wait() == 3


@pytest.mark.timeout(240)
def test_no_tty_pipes_streams_apart_and_passes_eof(berth: Berth, app: str) -> None:
    out = berth("run", "--no-tty", "-a", app, "--", "sh", "-c",
                "tr a-z A-Z; echo to-stderr >&2; exit 4",
                check=False, input="hello\nworld", timeout=120)
    assert out.returncode == 4, out
    assert out.stdout == "HELLO\nWORLD"
    assert out.stderr == "to-stderr\n"
    # the environment its instances get: config, host names, the framework's layers
    out = berth("run", "-a", app, "--", "sh", "-c", "echo $BERTH_FRAMEWORK $BERTH_HOSTNAMES",
                input="", timeout=120)
    assert out.stdout == f"flask {app}.localhost\n"
    # stdin that is not a terminal means no terminal by default
    out = berth("run", "-a", app, "--", "sh", "-c", "test -t 0 || echo no-terminal",
                check=False, input="", timeout=120)
    assert (out.returncode, out.stdout) == (0, "no-terminal\n"), out


@pytest.mark.timeout(240)
def test_ctrl_c_without_a_terminal_is_passed_on_as_sigint(berth: Berth, app: str) -> None:
    cli = subprocess.Popen([sys.executable, "-m", "cli.main", "run", "-a", app, "--",
                            "python", "winch.py"], cwd=ROOT, env=berth.env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        assert cli.stdout is not None
        assert cli.stdout.readline() == b"ready -\n"  # no terminal: pipes
        cli.send_signal(signal.SIGINT)             # what ^C in a shell pipeline does
        out, err = cli.communicate(timeout=30)
        assert out == b"interrupted\n" and cli.returncode == 7, (out, err)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


@pytest.mark.timeout(240)
def test_a_run_is_the_apps_user_and_cannot_read_another_app(berth: Berth, app: str
                                                            ) -> None:
    apps_dir = Path(berth.platform.apps_dir) / "runner-1"
    out = berth("run", "-a", app, "--", "sh", "-c",
                f"id -u; ls {apps_dir / OTHER} || echo refused; ls {apps_dir / app}",
                check=False, input="", timeout=120)
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    uid = int(lines[0])
    assert uid == os.stat(apps_dir / app).st_uid    # the app's own user...
    assert pwd.getpwuid(uid).pw_name.endswith(f"-{app}")
    assert uid != 0 and uid != os.stat(apps_dir / OTHER).st_uid   # ...not the other's
    assert "refused" in lines and "Permission denied" in out.stderr
    assert {"releases", "venvs", "data"} <= set(lines)


@pytest.mark.timeout(240)
def test_detached_output_goes_to_the_logs_and_ps_shows_it(berth: Berth, app: str) -> None:
    out = berth("run", "--detach", "-a", app, "--", "sh", "-c",
                "echo detached-hello; sleep 4; echo detached-bye >&2", timeout=60)
    proc = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"run\.[0-9a-f]{8}", proc), out.stdout
    shown = berth.wait_for(lambda: [r for r in runs(berth, app) if f"run.{r['run']}" == proc
                                    and r["state"] == "RUNNING"], 30, "the run in ps")
    assert shown[0]["detach"] and "echo detached-hello" in shown[0]["command"]
    assert proc in berth("ps", "-a", app).stdout
    berth.wait_for(lambda: f"{proc} exited with code 0" in berth("logs", "-a", app).stdout,
                   30, "the run's end in the logs")
    logs = berth("logs", "-a", app).stdout
    assert re.search(rf"{re.escape(proc)}.*detached-hello", logs), logs
    assert re.search(rf"{re.escape(proc)}.*detached-bye", logs), logs
    berth.wait_for(lambda: not [r for r in runs(berth, app) if f"run.{r['run']}" == proc],
                   15, "the run gone from ps")


@pytest.mark.timeout(240)
def test_a_run_whose_client_goes_away_is_ended(berth: Berth, app: str) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run", "--no-tty", "-a", app, "--", "sh", "-c",
         "trap 'echo hung-up; exit 1' HUP; echo waiting; sleep 120 & wait"],
        cwd=ROOT, env=berth.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert cli.stdout is not None
        assert cli.stdout.readline() == b"waiting\n"
        (run,) = berth.wait_for(lambda: [r for r in runs(berth, app)
                                         if r["state"] == "RUNNING" and not r["detach"]],
                                30, "the run in ps")
        cli.kill()                                  # no goodbye: the connection drops
        cli.wait(10)
        berth.wait_for(lambda: not [r for r in runs(berth, app) if r["run"] == run["run"]],
                       20, "the run ended")
        logs = berth("logs", "-a", app).stdout
        assert f"run.{run['run']} the client went away" in logs, logs
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)


@pytest.mark.timeout(120)
def test_errors_say_what_to_do(berth: Berth, app: str) -> None:
    berth("apps", "create", "empty-app")
    out = berth("run", "-a", "empty-app", "--", "true", check=False, input="")
    assert out.returncode != 0 and "has no code to run yet" in out.stderr
    assert "berth push" in out.stderr
    out = berth("run", "-a", "no-such-app", "--", "true", check=False, input="")
    assert out.returncode == 4 and "not found" in out.stderr
    out = berth("run", "-a", app, "--", "exit 5", check=False, input="")
    assert out.returncode == 5                      # one word is shell code
    # the API refuses an attach that does not upgrade, and a second client
    conn = http.client.HTTPConnection("127.0.0.1", berth.platform.ports.api, timeout=10)
    conn.request("GET", "/v1/runs/0123abcd/attach",
                 headers={"Authorization": f"Bearer {berth.platform.admin_token}"})
    resp = conn.getresponse()
    assert resp.status == 426 and "Upgrade" in json.loads(resp.read())["error"]["message"]
    conn.close()


@pytest.mark.timeout(300)
def test_the_data_dir_survives_a_redeploy_and_a_restart(berth: Berth, app: str,
                                                        tmp_path: Path) -> None:
    """BERTH_DATA_DIR is the app's own persistent volume: what one release (or run)
    writes there, the next one reads; code dirs are per release."""
    marker = f"kept-{time.time_ns()}"
    out = berth("run", "--no-tty", "-a", app, "--", "sh", "-c",
                f'echo {marker} > "$BERTH_DATA_DIR/kept.txt" && stat -c %U "$BERTH_DATA_DIR"',
                input="", timeout=120)
    owner = out.stdout.strip()
    assert owner != "root" and app in owner, owner       # the app's own user
    berth("config", "set", f"DATA_PROBE={marker}", "-a", app)     # a new release: restart
    out = berth("run", "--no-tty", "-a", app, "--", "sh", "-c",
                'cat "$BERTH_DATA_DIR/kept.txt"; echo "$DATA_PROBE"', input="", timeout=120)
    assert out.stdout.split() == [marker, marker], out.stdout
