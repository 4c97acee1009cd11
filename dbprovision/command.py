"""The one way Berth runs an external program (initdb, pg_ctl, pg_dump, psql,
redis-server, redis-cli; backups reuse it for btrfs and rsync).

Why one wrapper: every call then gets the same guarantees. An argument list, never a
shell string, so no name or path is ever parsed by a shell. A timeout, after which the
program's whole process group is killed (it runs in a session of its own, so a
program's children die with it and the caller's own group is never hit). The end of
its stderr inside the error raised, so a failure explains itself in the log and in the
CLI. And, as root, an optional user to run as (initdb refuses root; servers should not
run as root), with supplementary groups cleared.
"""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandFailed, CommandTimedOut, ProgramMissing

log = logging.getLogger(__name__)

STDERR_TAIL = 2000        # characters of stderr kept in an error


@dataclass(frozen=True)
class RunAs:
    """The system user a program runs as (root only). `home` is set as HOME."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @classmethod
    def current(cls) -> RunAs:
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


@dataclass(frozen=True)
class Result:
    """What a finished program left: its exit code and output (text)."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(args: Sequence[str | Path], *, timeout: float, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, user: RunAs | None = None, input: str | None = None,
        check: bool = True, hint: str = "") -> Result:
    """Run `args` to completion within `timeout` seconds.

    `env` replaces the environment when given (PATH and LANG are kept unless it sets
    them). With `check` (the default) an exit code other than 0 raises CommandFailed;
    a timeout always raises CommandTimedOut, after killing the process group; a
    program that is not there raises ProgramMissing. `hint` goes into those errors.
    """
    argv = [os.fspath(a) for a in args]
    program = Path(argv[0]).name
    switch = user is not None and not user.is_self
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
            cwd=cwd, env=_environment(env, user), start_new_session=True,
            # subprocess's own setgroups([]), setgid, setuid, in that order, in the child
            user=user.uid if switch and user else None,
            group=user.gid if switch and user else None,
            extra_groups=[] if switch else None)
    except FileNotFoundError as exc:
        raise ProgramMissing(f"{program} is not installed ({argv[0]} not found)",
                             program=program) from exc
    except PermissionError as exc:
        raise CommandFailed(f"{program} could not be started: {exc.strerror}",
                            hint or f"check that {argv[0]} is executable by "
                            f"{user.name if user else 'this user'}",
                            program=program) from exc
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = _collect(proc)
        raise CommandTimedOut(
            f"{program} did not finish within {timeout:g} s and was killed",
            hint or f"the command was: {_shown(argv)}", program=program,
            exit_code=proc.returncode, stderr_tail=_tail(stderr)) from None
    except BaseException:
        _kill_group(proc.pid)
        _collect(proc)
        raise
    seconds = time.monotonic() - started
    result = Result(tuple(argv), proc.returncode, stdout, stderr, seconds)
    log.debug("ran %s", program, extra={"program": program, "code": proc.returncode,
                                         "seconds": round(seconds, 3)})
    if check and proc.returncode != 0:
        raise failure(result, hint)
    return result


def program_path(program: str | Path) -> str:
    """The absolute path of `program` (a runner starts supervised servers by path)."""
    found = shutil.which(str(program))
    if found is None:
        raise ProgramMissing(f"{program} is not installed (not found on PATH)",
                             program=Path(program).name)
    return os.path.abspath(found)


def failure(result: Result, hint: str = "") -> CommandFailed:
    """The error for a finished program that failed (for callers with check=False)."""
    program = Path(result.args[0]).name
    tail = _tail(result.stderr) or _tail(result.stdout)
    how = (f"was killed by signal {-result.returncode}" if result.returncode < 0
           else f"exited with code {result.returncode}")
    message = f"{program} {how}"
    if tail:
        message += f": {tail}"
    return CommandFailed(message, hint or f"the command was: {_shown(list(result.args))}",
                         program=program, exit_code=result.returncode, stderr_tail=tail)


def _environment(env: Mapping[str, str] | None, user: RunAs | None) -> dict[str, str] | None:
    if env is None and (user is None or user.is_self):
        return None
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if user is not None and not user.is_self:
        base.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    base.update(env or {})
    return base


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Whatever the killed program wrote; a grandchild that escaped the group and
    still holds the pipes must not hang us, hence the short bound."""
    try:
        stdout, stderr = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "", ""
    return stdout or "", stderr or ""


def _tail(text: str) -> str:
    text = (text or "").strip()
    if len(text) <= STDERR_TAIL:
        return text
    return "..." + text[-STDERR_TAIL:]


def _shown(argv: list[str]) -> str:
    return " ".join(argv)
