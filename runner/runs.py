"""One-off runs (`berth run`): a command in an app's release, with its venv, config
and user, in its own jail and cgroup (the app's memory and process limits), with a
pseudo-terminal or with pipes; never restarted.

    PREPARING --spawned--> RUNNING --exit, output drained--> STOPPED
        |                     |
        |                     +--end (client gone, timeout, destroy)--> STOPPING
        |                                      STOPPING --exit, drained--> STOPPED
        +--prepare failed / ended before it started--> STOPPED

How the terminal reaches the command through the jail: the pty's slave is the
command's stdin/stdout/stderr, and `setsid -c` (util-linux), run inside the jail
after bwrap and setpriv, makes the command a session leader with the slave as its
controlling terminal. Job control then works as on a login: the command (a shell)
puts its jobs in process groups and hands the terminal to the foreground one, the
kernel sends ^C's SIGINT and a resize's SIGWINCH to that group alone, and bwrap's
own processes, in the runner-made session outside, never see them. (bwrap's
--new-session would leave the command without a controlling terminal.) TIOCSTI from
inside can only inject into the run's own terminal.

Everything here runs on the runner's loop thread except the stream readers, one
thread per stream, which only put chunks on the run's bounded queue and wake the
loop. Output goes to the controller in run_output messages while the run's credit
window (RUN_WINDOW bytes unacknowledged) allows; when it is full the queue fills,
the reader stops reading, and the command blocks on its write: backpressure reaches
the command instead of memory. A detached run's output goes to the app's logs as
proc `run.<id>` instead. Input is written non-blocking and acknowledged as written.
"""
from __future__ import annotations

import enum
import fcntl
import logging
import os
import pty
import queue
import select
import signal
import struct
import subprocess
import termios
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from messaging.messages import RUN_CHUNK, RUN_SIGNALS, RUN_WINDOW
from messaging.shapes import RunItem, State
from runner.cgroups import Limits
from runner.isolation import InstanceJail
from runner.process import exited_unreaped
from runner.procfile import shell_argv

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 8            # chunks read ahead per run before its readers wait
EXIT_DRAIN = 2.0            # seconds after exit that readers may still find output
EXIT_FLUSH = 30.0           # seconds after exit that output may wait for the window
TIOCGSID = getattr(termios, "TIOCGSID", 0x5429)
DEFAULT_TERM = "xterm-256color"


class Mode(str, enum.Enum):
    TTY = "tty"             # a pseudo-terminal: one stream, job control, resize
    PIPES = "pipes"         # stdin, stdout, stderr apart; stdin EOF reaches the command
    DETACHED = "detached"   # no stdin; output lines go to the app's logs


@dataclass(frozen=True)
class RunSpec:
    run: str
    app: str
    release: int
    command: str
    env: dict[str, str]
    slug: str
    slug_url: str
    mode: Mode
    cols: int = 80
    rows: int = 24
    timeout: float = 3600.0
    memory_mb: int | None = None
    pids_max: int | None = None

    @property
    def proc(self) -> str:
        return f"run.{self.run}"

    @property
    def instance(self) -> str:
        """Its cgroup's name beside the app's instances."""
        return f"run-{self.run}"

    def limits(self, defaults: Limits) -> Limits:
        return Limits(self.memory_mb << 20 if self.memory_mb else defaults.memory_bytes,
                      self.pids_max or defaults.pids)


def exit_code(returncode: int) -> int:
    """A shell's convention: death by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(code: int) -> str:
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


@dataclass
class Run:
    """One run, owned by the loop thread; its readers touch only `chunks`."""

    spec: RunSpec
    created: float
    wall: float
    state: State = State.PREPARING
    reason: str = "fetching slug and preparing virtualenv"
    proc: subprocess.Popen[bytes] | None = None
    jail: InstanceJail | None = None
    release_dir: Path | None = None
    venv_bin: Path | None = None
    master: int | None = None               # the pty's master (TTY)
    stdin: IO[bytes] | None = None          # the command's stdin pipe (PIPES)
    pipes: list[IO[bytes]] = field(default_factory=list)
    chunks: queue.Queue[tuple[str, bytes]] = field(
        default_factory=lambda: queue.Queue(QUEUE_CHUNKS))
    readers: list[threading.Thread] = field(default_factory=list)
    stop_reading: threading.Event = field(default_factory=threading.Event)
    pending_out: deque[tuple[str, bytes]] = field(default_factory=deque)
    unacked: int = 0                        # output bytes sent, not yet acknowledged
    pending_in: bytearray = field(default_factory=bytearray)
    eof_in: bool = False
    kill_at: float | None = None
    exited_at: float | None = None
    code: int | None = None
    error: dict[str, Any] | None = None
    leader: int | None = None               # the command's session (= its pgid)

    @property
    def id(self) -> str:
        return self.spec.run

    @property
    def deadline(self) -> float:
        return self.created + self.spec.timeout

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def item(self) -> RunItem:
        return RunItem(run=self.id, app=self.spec.app, release=self.spec.release,
                       command=self.spec.command, state=self.state,
                       detach=self.spec.mode is Mode.DETACHED,
                       tty=self.spec.mode is Mode.TTY, pid=self.pid, since=self.wall)

    # ---- spawning ------------------------------------------------------------
    def environment(self, data_dir: Path | None) -> dict[str, str]:
        assert self.release_dir is not None
        path = ":".join(p for p in (str(self.venv_bin) if self.venv_bin else "",
                                    "/usr/local/bin", "/usr/bin", "/bin") if p)
        env = {"PATH": path, "HOME": str(data_dir or self.release_dir), "LANG": "C.UTF-8",
               "PYTHONUNBUFFERED": "1", "BERTH_APP": self.spec.app,
               "BERTH_RELEASE": str(self.spec.release), "BERTH_RUN": self.id}
        if self.venv_bin is not None:
            env["VIRTUAL_ENV"] = str(self.venv_bin.parent)
        if data_dir is not None:
            env["BERTH_DATA_DIR"] = str(data_dir)
        env.update(self.spec.env)
        if self.spec.mode is Mode.TTY:
            env.setdefault("TERM", DEFAULT_TERM)
        return env

    def argv(self) -> list[str]:
        """`setsid [-c] /bin/sh -c COMMAND`, in the jail when there is one."""
        inner = ["setsid", "-c"] if self.spec.mode is Mode.TTY else ["setsid"]
        inner += shell_argv(self.spec.command)
        return self.jail.argv(inner) if self.jail is not None else inner

    def spawn(self, release_dir: Path, venv_bin: Path | None, data_dir: Path | None,
              jail: InstanceJail, wake: Callable[[], None]) -> None:
        """Start the command (RUNNING); OSError when it cannot be started."""
        self.release_dir, self.venv_bin, self.jail = release_dir, venv_bin, jail
        env = self.environment(data_dir)
        # in a jail the runner-made session holds bwrap alone (setsid inside makes the
        # command's); without one, setsid(1) needs a child that leads no group
        isolated = jail.isolated
        if self.spec.mode is Mode.TTY:
            master, slave = pty.openpty()
            try:
                fcntl.ioctl(master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", self.spec.rows, self.spec.cols, 0, 0))
                self.proc = subprocess.Popen(
                    self.argv(), cwd=release_dir, env=env, stdin=slave, stdout=slave,
                    stderr=slave, start_new_session=isolated)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            os.set_blocking(master, False)
            self.master = master
            self._read(master, "tty", wake)
        else:
            stdin = subprocess.PIPE if self.spec.mode is Mode.PIPES else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                self.argv(), cwd=release_dir, env=env, stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                start_new_session=isolated)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.pipes = [self.proc.stdout, self.proc.stderr]
            if self.proc.stdin is not None:
                self.stdin = self.proc.stdin
                os.set_blocking(self.stdin.fileno(), False)
            if self.spec.mode is Mode.PIPES:
                self._read(self.proc.stdout.fileno(), "stdout", wake)
                self._read(self.proc.stderr.fileno(), "stderr", wake)
        if not isolated:
            self.leader = self.proc.pid
        self.state, self.reason = State.RUNNING, f"pid {self.proc.pid}"

    def _read(self, fd: int, stream: str, wake: Callable[[], None]) -> None:
        thread = threading.Thread(target=_reader, name=f"run-{self.id}-{stream}",
                                  args=(fd, stream, self.chunks, self.stop_reading, wake),
                                  daemon=True)
        self.readers.append(thread)
        thread.start()

    # ---- input, size, signals --------------------------------------------------
    def feed(self, data: bytes, eof: bool = False) -> None:
        self.pending_in += data
        self.eof_in = self.eof_in or eof

    def write_input(self) -> int:
        """Write what the command takes without blocking; bytes consumed (written, or
        dropped because nothing reads them any more)."""
        if self.state is State.PREPARING:
            return 0                    # kept (within the window) until it starts
        fd = self.master if self.master is not None else \
            self.stdin.fileno() if self.stdin is not None else None
        done = 0
        if fd is None or self.exited_at is not None:
            done, self.pending_in = len(self.pending_in), bytearray()
            return done
        while self.pending_in:
            try:
                n = os.write(fd, self.pending_in[:RUN_CHUNK])
            except BlockingIOError:
                break
            except OSError:             # EPIPE / EIO: the command stopped reading
                n = len(self.pending_in)
            del self.pending_in[:n]
            done += n
        if self.eof_in and not self.pending_in and self.stdin is not None:
            self.stdin.close()          # the command reads EOF
            self.stdin = None
        return done

    def resize(self, cols: int, rows: int) -> None:
        if self.master is not None:
            try:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))
            except OSError:
                pass

    def send_signal(self, name: str) -> bool:
        """Deliver SIG<name> to the foreground process group of the run's terminal
        or, without one, to the command's process group."""
        if name not in RUN_SIGNALS or self.proc is None or self.exited_at is not None:
            return False
        return self._kill(self._foreground(), getattr(signal, f"SIG{name}"))

    def end(self, now: float, grace: float, reason: str) -> None:
        """Hang up (SIGHUP to the command's session and foreground group), SIGKILL
        everything of the run after `grace`."""
        if self.exited_at is not None:
            return                      # only its last output is still on the way
        if self.state in (State.STOPPING, State.STOPPED):
            if self.kill_at is not None:
                self.kill_at = min(self.kill_at, now + grace)
            return
        if self.proc is None:
            # PREPARING -> STOPPED: nothing was started
            self.state, self.reason = State.STOPPED, reason
            self.code = 128 + signal.SIGHUP
            return
        for pgid in {self._foreground(), self._session()}:
            self._kill(pgid, signal.SIGHUP)
            self._kill(pgid, signal.SIGCONT)
        self.kill_at = now + grace
        # RUNNING -> STOPPING: waits for the exit
        self.state, self.reason = State.STOPPING, reason

    # ---- time-driven step ---------------------------------------------------------
    def tick(self, now: float, grace: float) -> None:
        if self.proc is None or self.state is State.STOPPED:
            return
        if self.exited_at is None:
            if exited_unreaped(self.proc):
                self._reap(now)
            elif self.kill_at is not None and now >= self.kill_at:
                self.kill_at = None
                self._kill_everything()
            elif self.state is State.RUNNING and now >= self.deadline:
                self.end(now, grace, f"ran longer than its limit of {self.spec.timeout:g}s")
        elif now - self.exited_at >= EXIT_DRAIN:
            self.stop_reading.set()     # something of it still holds the streams

    def _reap(self, now: float) -> None:
        assert self.proc is not None
        # the zombie pins the group id: kill what is left of the group, then reap
        self._kill(self.proc.pid, signal.SIGKILL)
        self.code = exit_code(self.proc.wait())
        self.exited_at = now
        if self.state is State.RUNNING:
            self.reason = describe(self.code)
        elif self.reason:
            self.reason += f" ({describe(self.code)})"

    def _kill_everything(self) -> None:
        assert self.proc is not None
        self._kill(self.proc.pid, signal.SIGKILL)      # bwrap: its pid namespace dies
        if self.jail is not None and self.jail.group is not None:
            for pid in self.jail.group.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.leader is not None:
            self._kill(self.leader, signal.SIGKILL)

    def drained(self, now: float) -> bool:
        """Exited, every reader done and every chunk sent (or given up on)."""
        if self.exited_at is None:
            return self.proc is None and self.state is State.STOPPED
        if now - self.exited_at >= EXIT_FLUSH:
            return True
        if any(t.is_alive() for t in self.readers):
            return False
        if self.spec.mode is Mode.DETACHED:     # read_lines closes each pipe at EOF
            return all(pipe.closed for pipe in self.pipes)
        return self.chunks.empty() and not self.pending_out

    def finish(self) -> None:
        """STOPPED: close what is left and remove the cgroup."""
        self.stop_reading.set()
        self.state = State.STOPPED
        if self.master is not None:
            os.close(self.master)
            self.master = None
        for pipe in [*self.pipes, *([self.stdin] if self.stdin else [])]:
            pipe.close()
        self.pipes, self.stdin = [], None
        if self.jail is not None:
            self.jail.remove()

    # ---- output -------------------------------------------------------------------
    def take_output(self) -> list[tuple[str, bytes]]:
        """Chunks to send now, within the credit window; sent ones count as unacked."""
        out: list[tuple[str, bytes]] = []
        while self.unacked < RUN_WINDOW:
            if self.pending_out:
                stream, data = self.pending_out.popleft()
            else:
                try:
                    stream, data = self.chunks.get_nowait()
                except queue.Empty:
                    break
            self.unacked += len(data)
            out.append((stream, data))
        return out

    def unsent(self, chunks: list[tuple[str, bytes]]) -> None:
        """Chunks that could not go out (socket full): first next time."""
        for stream, data in reversed(chunks):
            self.unacked -= len(data)
            self.pending_out.appendleft((stream, data))

    def acked(self, n: int) -> None:
        self.unacked = max(0, self.unacked - n)

    # ---- process groups --------------------------------------------------------------
    def _foreground(self) -> int | None:
        if self.master is not None:
            return _ioctl_pid(self.master, termios.TIOCGPGRP)
        return self._session()

    def _session(self) -> int | None:
        if self.leader is None:
            if self.master is not None:
                self.leader = _ioctl_pid(self.master, TIOCGSID)
            elif self.proc is not None:
                self.leader = _session_below(self.proc.pid)
        return self.leader

    @staticmethod
    def _kill(pgid: int | None, sig: int) -> bool:
        if pgid is None or pgid <= 1:
            return False
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _reader(fd: int, stream: str, chunks: queue.Queue[tuple[str, bytes]],
            stop: threading.Event, wake: Callable[[], None]) -> None:
    """Thread: chunks of a stream onto the run's bounded queue until EOF (for a pty,
    EIO once no process holds its slave) or until told to stop."""
    while not stop.is_set():
        try:
            ready, _, _ = select.select([fd], [], [], 0.5)
        except (OSError, ValueError):
            return
        if not ready:
            continue
        try:
            data = os.read(fd, RUN_CHUNK)
        except BlockingIOError:
            continue
        except OSError:
            break
        if not data:
            break
        while not stop.is_set():
            try:
                chunks.put((stream, data), timeout=0.5)
                break
            except queue.Full:
                continue        # the window is closed: the command waits with us
        wake()
    wake()


def _ioctl_pid(fd: int, request: int) -> int | None:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0])
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        return []


def _session_below(outer: int) -> int | None:
    """The command's session leader under a jail: bwrap (outer) -> bwrap, the pid
    namespace's init -> the command, which `setsid` made a session leader."""
    for init in _children(outer):
        for pid in _children(init):
            try:
                if os.getsid(pid) == pid:
                    return pid
            except OSError:
                continue
    return None
