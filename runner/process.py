"""One app instance as an explicit state machine, in the style of supervisor.

    PREPARING --prepared--> STARTING --healthy / settled--> RUNNING
        |                      |  ^                            |
        |                 exit |  | delay over                 | exit
        |                      v  |                            v
        +--prepare failed---> BACKOFF <------------------------+
                               |  (start_retries failures in a row)
                               v
                             FATAL
    any state --stop--> STOPPING (process alive) or STOPPED (none) ; STOPPING --exit--> STOPPED
    PREPARING --adopt--> RUNNING or STARTING (a process a killed runner left: adopt.py)

Every change of state goes through `Instance._transition`, which checks it against
TRANSITIONS. The instance is owned by the daemon's loop thread: it never blocks and
never starts threads; the daemon feeds it events (prepared, spawn_done, healthy, stop,
tick) and learns what happened through `Hooks`. OS calls go through `ProcessOps`.

Spawning is asynchronous: entering STARTING makes a `SpawnRequest` (argv, cwd,
environment, all decided here) that `Hooks.spawn` carries out wherever it likes (the
daemon: a bounded pool of job threads, so a hundred starts never hold up its loop)
and answers with `spawn_done(SpawnResult)`. Until then the instance is STARTING with
no process; a stop meanwhile makes it STOPPING, and the process is signalled as soon
as it exists. The default `Hooks.spawn` spawns at once (tests).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from messaging.manifest import Manifest
from messaging.shapes import InventoryItem, State
from runner.adopt import AdoptedProcess
from runner.cgroups import Limits
from runner.isolation import InstanceJail
from runner.ports import free_port
from runner.procfile import shell_argv

log = logging.getLogger(__name__)


# The runner's states; PENDING and DRAINING are the controller's views and never
# occur here. State itself is declared once, in messaging.shapes.
TRANSITIONS: dict[State, frozenset[State]] = {
    # slug fetched and venv ready -> spawned; fetch failed -> retry later;
    # build failed -> FATAL; stop while preparing -> STOPPED (nothing to kill);
    # adopted from a killed runner, answering its health check -> RUNNING
    State.PREPARING: frozenset({State.STARTING, State.RUNNING, State.BACKOFF, State.FATAL,
                                State.STOPPED}),
    # health check passed (web) or stayed up (others) -> RUNNING; died or failed the
    # health check -> BACKOFF, or FATAL when out of retries; stop -> STOPPING
    State.STARTING: frozenset({State.RUNNING, State.BACKOFF, State.FATAL, State.STOPPING}),
    # crashed -> BACKOFF / FATAL; stop -> STOPPING
    State.RUNNING: frozenset({State.BACKOFF, State.FATAL, State.STOPPING}),
    # delay over -> spawn again (STARTING) or re-prepare; spawn itself failed -> stay
    # in BACKOFF with a longer delay or FATAL; stop -> STOPPED (no process)
    State.BACKOFF: frozenset({State.STARTING, State.PREPARING, State.BACKOFF, State.FATAL,
                              State.STOPPED}),
    # the process group is gone -> STOPPED
    State.STOPPING: frozenset({State.STOPPED}),
    # only a command ends it
    State.FATAL: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
}


class TransitionError(RuntimeError):
    pass


class Process(Protocol):
    """What the supervisor needs of a process: a subprocess.Popen, or an
    AdoptedProcess (started by a previous runner; its exit status is unknown)."""
    pid: int
    returncode: int | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


def exited_unreaped(proc: Process) -> bool:
    """True once the process has exited, without reaping it: the zombie keeps its
    pid (and so its process group id) from being reused until it is reaped."""
    if isinstance(proc, AdoptedProcess):
        return proc.exited()        # not our child: its pidfd tells
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll() is not None
    return info is not None


OUTPUT_TAIL = 40     # output lines kept per instance, shown when it crashes


def backoff_delay(failures: int, maximum: float) -> float:
    """Seconds to wait after `failures` consecutive failures: 2, 4, 8... up to maximum."""
    return float(min(maximum, 2 ** max(failures, 0)))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: it was adopted from a runner that was restarted)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    if code == 127:     # the shell's answer for a program it could not find
        return "exited with code 127: command not found"
    if code == 126:
        return "exited with code 126: command not executable"
    return f"exited with code {code}"


@dataclass
class Policy:
    """How instances are supervised; filled from the runner settings."""
    address: str = "127.0.0.1"
    health_timeout: float = 60.0
    stop_grace: float = 10.0
    start_retries: int = 5
    backoff_max: float = 30.0
    settle_seconds: float = 1.0     # a non-web process up this long is RUNNING
    stable_seconds: float = 10.0    # RUNNING this long forgives earlier failures


@dataclass
class InstanceSpec:
    """What the controller asked for in a `start` command."""
    instance: str
    app: str
    release: int
    proc: str
    command: str
    env: dict[str, str]
    slug: str
    slug_url: str
    host_header: str | None = None
    memory_mb: int | None = None        # the app's own limits; None = the runner's default
    pids_max: int | None = None
    manifest: Manifest = field(default_factory=Manifest)   # the app's berth.yaml
    stop_signal: int = signal.SIGTERM   # an addon server's may differ (runner/services.py)

    @property
    def web(self) -> bool:
        return self.proc == "web"

    def limits(self, defaults: Limits) -> Limits:
        return Limits(self.memory_mb << 20 if self.memory_mb else defaults.memory_bytes,
                      self.pids_max or defaults.pids)


@dataclass(frozen=True)
class SpawnRequest:
    """One spawn of an instance, decided on the loop thread (the command already in
    its jail, the environment, the port) and carried out by whoever `Hooks.spawn`
    hands it to: making the instance dir and the fork/exec."""
    instance: str
    generation: int
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    instance_dir: Path


@dataclass
class SpawnResult:
    generation: int
    proc: Process | None = None
    error: str | None = None        # why it could not be started (proc is None)


def do_spawn(ops: ProcessOps, request: SpawnRequest) -> SpawnResult:
    """The blocking part of a start; safe in any thread (it touches no Instance)."""
    try:
        request.instance_dir.mkdir(parents=True, exist_ok=True)
        proc = ops.spawn(request.argv, request.cwd, request.env)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return SpawnResult(request.generation, error=str(exc))
    return SpawnResult(request.generation, proc)


PIPE_SIZE = 1 << 20     # output an instance may write while no runner reads it


class ProcessOps:
    """The OS calls a supervisor makes; one object so a test can watch or replace it."""

    def spawn(self, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """In its own session; stdout and stderr are pipes whose read ends the process
        holds too (inherited, never read there), so a runner that dies does not take
        the pipes with it: the app's writes wait in the pipe (PIPE_SIZE) instead of
        failing with EPIPE, and the next runner reads on (runner/adopt.py)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            for fd in (out_w, err_w):
                try:
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass        # above /proc/sys/fs/pipe-max-size: the default size
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out_w, stderr=err_w, pass_fds=(out_r, err_r),
                                    start_new_session=True)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        proc.stdout = os.fdopen(out_r, "rb")
        proc.stderr = os.fdopen(err_r, "rb")
        return proc

    def exited(self, proc: Process) -> bool:
        return exited_unreaped(proc)

    def reap(self, proc: Process) -> int | None:
        return proc.wait()

    def signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Hooks:
    """What the daemon wants to hear about; the default hears nothing and spawns at
    once, on the caller's thread."""

    def spawn(self, inst: Instance, request: SpawnRequest) -> None:
        """Start the process `request` describes, then call `inst.spawn_done` with the
        result on the loop thread (the daemon does it in a job)."""
        inst.spawn_done(do_spawn(inst.ops, request))

    def spawned(self, inst: Instance) -> None:
        """A process was started: read its output and (web) health-check it."""

    def prepare(self, inst: Instance) -> None:
        """The instance went back to PREPARING: fetch and build again."""

    def event(self, inst: Instance, text: str) -> None:
        """A platform event the tenant should see (started, crashed, fatal, stopped)."""


@dataclass
class Instance:
    spec: InstanceSpec
    policy: Policy
    instance_dir: Path
    ops: ProcessOps = field(default_factory=ProcessOps)
    hooks: Hooks = field(default_factory=Hooks)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time

    state: State = State.PREPARING
    reason: str = "fetching slug and preparing virtualenv"
    since: float = 0.0
    restarts: int = 0
    failures: int = 0               # consecutive failed starts
    generation: int = 0             # bumped on every spawn; stale job results are ignored
    port: int | None = None
    proc: Process | None = None
    release_dir: Path | None = None
    venv_bin: Path | None = None
    control_socket: bool = False
    jail: InstanceJail | None = None    # user, jail and cgroup (None: not prepared yet)
    data_dir: Path | None = None    # the app's persistent dir (BERTH_DATA_DIR)
    oom_kills: int = 0              # processes the kernel killed for memory, so far
    # the app's last output lines (the runner appends them), for reporting a crash
    output_tail: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_TAIL))

    _started_at: float = 0.0
    _running_at: float = 0.0
    _retry_at: float = 0.0
    _kill_at: float | None = None
    _spawning: bool = False         # a SpawnRequest is out; its result not back yet
    _healthy_early: bool = False
    _fail_reason: str | None = None
    _reprepare: bool = False
    _next_oom_check: float = 0.0

    def __post_init__(self) -> None:
        self.since = self.wall()

    @property
    def id(self) -> str:
        return self.spec.instance

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ---- the one place state changes -------------------------------------------
    def _transition(self, new: State, reason: str) -> None:
        if new not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.id}: {self.state.value} -> {new.value} "
                                  "is not a transition")
        old = self.state
        self.state, self.reason, self.since = new, reason, self.wall()
        log.info("%s -> %s: %s", old.value, new.value, reason,
                 extra={"app": self.spec.app, "release": self.spec.release,
                        "instance": self.id})
        self.hooks.event(self, f"{self.spec.proc}.{self.id} {new.value}: {reason}")

    # ---- events fed by the daemon ----------------------------------------------
    def prepared(self, release_dir: Path, venv_bin: Path, control_socket: bool,
                 jail: InstanceJail | None = None, data_dir: Path | None = None) -> None:
        """The slug is unpacked and the venv is ready: spawn the process."""
        if self.state is not State.PREPARING:
            return      # stopped meanwhile
        self.release_dir, self.venv_bin, self.control_socket = \
            release_dir, venv_bin, control_socket
        self.jail, self.data_dir = jail, data_dir
        self._spawn()

    def adopt(self, proc: Process, port: int | None, release_dir: Path, venv_bin: Path,
              control_socket: bool, jail: InstanceJail | None, data_dir: Path | None,
              generation: int, restarts: int, answering: bool) -> None:
        """Take over a process a killed runner left running (runner/adopt.py), without
        restarting it: RUNNING when it answered its health check (or is not a web
        process), else STARTING, as if just spawned (health checked from now)."""
        assert self.state is State.PREPARING and self.proc is None
        self.proc, self.port, self.generation, self.restarts = proc, port, generation, restarts
        self.release_dir, self.venv_bin, self.control_socket = \
            release_dir, venv_bin, control_socket
        self.jail, self.data_dir = jail, data_dir
        self.oom_kills = jail.oom_kills() if jail is not None else 0   # before our time
        self._started_at = self._running_at = self.clock()
        where = f" on {self.policy.address}:{port}" if port else ""
        if answering or not self.spec.web:
            # PREPARING -> RUNNING: it kept running while no runner watched it
            self._transition(State.RUNNING, f"adopted by a restarted runner (pid "
                                            f"{proc.pid}{where})")
        else:
            # PREPARING -> STARTING: alive, not answering yet
            self._transition(State.STARTING, f"adopted by a restarted runner (pid "
                                             f"{proc.pid}), waiting for HTTP{where}")

    def prepare_failed(self, message: str, retry: bool) -> None:
        """Fetching or building failed. A failed build will fail again: FATAL at
        once; a failed fetch (controller away?) is retried with backoff."""
        if self.state is not State.PREPARING:
            return
        if retry:
            self._reprepare = True
            self._failed(message, count_restart=False)
        else:
            # build failed -> FATAL: another try would build the same thing
            self._transition(State.FATAL, message)

    def healthy(self, generation: int) -> None:
        """The web health check got an answer below 500."""
        if self._spawning and generation == self.generation:
            self._healthy_early = True      # it answered before its spawn was reported
            return
        if self.state is State.STARTING and generation == self.generation \
                and self._fail_reason is None:
            self._running_at = self.clock()
            # STARTING -> RUNNING: it answers HTTP, so it can take traffic
            self._transition(State.RUNNING, f"answering HTTP on "
                                            f"{self.policy.address}:{self.port}")

    def stop(self, grace: float | None = None) -> None:
        """Commanded stop: SIGTERM to the process group, SIGKILL after grace."""
        grace = self.policy.stop_grace if grace is None else grace
        if self.state is State.STOPPED:
            return
        if self.state is State.STOPPING:
            # a second stop may only shorten the grace
            assert self._kill_at is not None
            self._kill_at = min(self._kill_at, self.clock() + grace)
            return
        self._kill_at = self.clock() + grace
        if self._spawning:
            # STARTING -> STOPPING: the process is being spawned; it gets SIGTERM as
            # soon as it exists (spawn_done)
            self._transition(State.STOPPING, f"stopping once it is spawned, SIGKILL "
                                             f"in {grace:g}s")
            return
        if self.proc is None:
            # PREPARING / BACKOFF / FATAL -> STOPPED: nothing runs
            self._kill_at = None
            self._transition(State.STOPPED, "stopped by command")
            return
        self.ops.signal_group(self.proc.pid, self.spec.stop_signal)
        # STARTING / RUNNING -> STOPPING: waits for the group to exit
        self._transition(State.STOPPING, f"{signal.Signals(self.spec.stop_signal).name} "
                                         f"sent, SIGKILL in {grace:g}s")

    def tick(self) -> bool:
        """Time-driven step: reap exits, act on deadlines. True when something
        changed that a heartbeat should carry."""
        before = (self.state, self.restarts, self.failures, self.oom_kills)
        now = self.clock()
        if self.proc is not None and self.ops.exited(self.proc):
            self._exited()
        elif self.state is State.STARTING and not self._spawning:
            if self.spec.web:
                if now - self._started_at >= self.policy.health_timeout \
                        and self._fail_reason is None:
                    self._fail_reason = (f"did not answer HTTP within "
                                         f"{self.policy.health_timeout:g}s")
                    assert self.proc is not None
                    self.ops.signal_group(self.proc.pid, signal.SIGKILL)
            elif now - self._started_at >= self.policy.settle_seconds:
                self._running_at = now
                # STARTING -> RUNNING: a non-web process that stayed up
                self._transition(State.RUNNING, f"up for {self.policy.settle_seconds:g}s")
        elif self.state is State.RUNNING:
            if self.failures and now - self._running_at >= self.policy.stable_seconds:
                self.failures = 0
        elif self.state is State.BACKOFF and now >= self._retry_at:
            if self._reprepare:
                self._reprepare = False
                # BACKOFF -> PREPARING: try the fetch/build again
                self._transition(State.PREPARING, "fetching slug and preparing virtualenv")
                self.hooks.prepare(self)
            else:
                self._spawn()
        elif self.state is State.STOPPING and self._kill_at is not None \
                and now >= self._kill_at and self.proc is not None:
            self.ops.signal_group(self.proc.pid, signal.SIGKILL)
            self._kill_at = None
        if self.proc is not None and now >= self._next_oom_check \
                and not self.ops.exited(self.proc):
            self._next_oom_check = now + 1.0
            if self._new_oom_kills():
                # a worker was killed but the process lives on (gunicorn respawns it)
                self.hooks.event(self, f"{self.spec.proc}.{self.id} out of memory: the "
                                       f"kernel killed a process over the limit of "
                                       f"{self._memory_limit()} ({self.oom_kills} so far)")
        return before != (self.state, self.restarts, self.failures, self.oom_kills)

    def _new_oom_kills(self) -> int:
        if self.jail is None:
            return 0
        total = self.jail.oom_kills()
        new, self.oom_kills = total - self.oom_kills, max(total, self.oom_kills)
        return max(new, 0)

    def _memory_limit(self) -> str:
        limit = self.jail.limits.memory_bytes if self.jail is not None else 0
        return f"{limit >> 20} MB" if limit else "the host"

    # ---- internals --------------------------------------------------------------
    def _exited(self) -> None:
        assert self.proc is not None
        # the zombie still pins the group id: kill what is left of the group (gunicorn
        # workers orphaned by a killed master), then reap
        self.ops.signal_group(self.proc.pid, signal.SIGKILL)
        code = self.ops.reap(self.proc)
        self.proc = None
        self.port = None
        oom = self._new_oom_kills()
        if self.state is State.STOPPING:
            # STOPPING -> STOPPED: a commanded stop, never counted as a crash
            self._transition(State.STOPPED, f"stopped ({describe_exit(code)})")
            return
        why = self._fail_reason or describe_exit(code)
        if oom:
            why = f"killed by the kernel: out of memory (limit {self._memory_limit()})"
        self._failed(why, count_restart=True)

    def _failed(self, why: str, count_restart: bool) -> None:
        """A start failed or a running process died: back off, or give up."""
        self.failures += 1
        self._fail_reason = None
        if self.failures >= self.policy.start_retries:
            # -> FATAL: stop the restart storm; stays listed with the reason
            self._transition(State.FATAL, f"{why}; gave up after {self.failures} "
                                          "failed starts in a row")
            return
        delay = backoff_delay(self.failures, self.policy.backoff_max)
        self._retry_at = self.clock() + delay
        if count_restart:
            self.restarts += 1
        # -> BACKOFF: wait, then start again on a new port
        self._transition(State.BACKOFF, f"{why}, restarting in {delay:g}s")

    def _spawn(self) -> None:
        """Ask for a process (Hooks.spawn); the answer comes to spawn_done."""
        assert self.release_dir is not None and self.venv_bin is not None
        self.generation += 1
        self.output_tail.clear()        # a new run: its own output from here on
        self._fail_reason = None
        self._kill_at = None
        try:
            self.port = free_port(self.policy.address) if self.spec.web else None
            args = self.args()
            if self.jail is not None:
                args = self.jail.argv(args)
            request = SpawnRequest(self.id, self.generation, args, self.release_dir,
                                   self.environment(), self.instance_dir)
        except (OSError, ValueError) as exc:
            self.port = None
            self._failed(f"cannot start `{self.spec.command}`: {exc}", count_restart=True)
            return
        self._spawning = True
        self._started_at = self.clock()
        # PREPARING / BACKOFF -> STARTING: the spawn is under way
        self._transition(State.STARTING, f"starting `{self.spec.command}`")
        self.hooks.spawn(self, request)

    def spawn_done(self, result: SpawnResult) -> bool:
        """The answer to this instance's SpawnRequest, on the loop thread. False when
        it is not the answer awaited (then the caller ends the process, if any)."""
        if not self._spawning or result.generation != self.generation:
            return False
        self._spawning = False
        healthy, self._healthy_early = self._healthy_early, False
        if result.proc is None:
            self.port = None
            if self.state is State.STOPPING:
                # STOPPING -> STOPPED: stopped while spawning, and nothing started
                self._kill_at = None
                self._transition(State.STOPPED, "stopped before it started")
            else:
                self._failed(f"cannot start `{self.spec.command}`: {result.error}",
                             count_restart=True)
            return True
        self.proc = result.proc
        self._started_at = self.clock()
        if self.state is State.STOPPING:
            # the stop came first: the new process gets it now
            assert self._kill_at is not None
            late = self.clock() >= self._kill_at
            self.ops.signal_group(self.proc.pid, signal.SIGKILL if late
                                  else self.spec.stop_signal)
            if late:
                self._kill_at = None
        else:
            where = (f"waiting for HTTP on {self.policy.address}:{self.port}"
                     if self.spec.web else "waiting for it to stay up")
            self.reason = f"pid {self.proc.pid}, {where}"
            self.hooks.event(self, f"{self.spec.proc}.{self.id} started: {self.reason}")
        self.hooks.spawned(self)
        if healthy:
            self.healthy(self.generation)
        return True

    def args(self) -> list[str]:
        """The Procfile command through /bin/sh with exec semantics (runner/procfile.py);
        the venv's bin leads PATH, so `gunicorn` is the app's own."""
        return shell_argv(self.spec.command)

    def environment(self) -> dict[str, str]:
        assert self.release_dir is not None
        path = ":".join(p for p in (str(self.venv_bin) if self.venv_bin else "",
                                    "/usr/local/bin", "/usr/bin", "/bin") if p)
        env = {
            "PATH": path,
            "HOME": str(self.data_dir or self.release_dir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "BERTH_APP": self.spec.app,
            "BERTH_RELEASE": str(self.spec.release),
            "BERTH_INSTANCE": self.id,
        }
        if self.venv_bin is not None:
            env["VIRTUAL_ENV"] = str(self.venv_bin.parent)
        if self.data_dir is not None:
            env["BERTH_DATA_DIR"] = str(self.data_dir)
        env.update({str(k): str(v) for k, v in self.spec.env.items()})
        if self.spec.web:
            assert self.port is not None
            env["PORT"] = str(self.port)
            gunicorn = f"--bind {self.policy.address}:{self.port}"
            if self.control_socket:
                gunicorn += f" --control-socket {self.control_socket_path()}"
            env["GUNICORN_CMD_ARGS"] = gunicorn
        return env

    def control_socket_path(self) -> str:
        """<instance dir>/gunicorn.ctl, or a short path in /tmp when that would not fit
        in a unix socket address (108 bytes); in a jail, its private /tmp (the app's
        user may not write the runner's instance dir)."""
        if self.jail is not None and self.jail.isolated:
            return "/tmp/gunicorn.ctl"
        path = self.instance_dir / "gunicorn.ctl"
        if len(str(path)) < 100:
            return str(path)
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"berth-{digest}.ctl")

    def inventory(self) -> InventoryItem:
        failing = self.state in (State.BACKOFF, State.FATAL)
        return InventoryItem(
            instance=self.id, app=self.spec.app, release=self.spec.release,
            proc=self.spec.proc, address=self.policy.address, port=self.port,
            state=self.state, restarts=self.restarts, pid=self.pid,
            since=self.since, reason=self.reason or "", oom_kills=self.oom_kills,
            last_output=list(self.output_tail) if failing else [])
