"""Per-app virtualenvs, cached by what they contain.

Key = sha256(format version + python version + requirements.txt bytes). The cache
dir may be shared by several runners: whoever builds holds an flock on <key>.lock.
A venv is complete only once `.berth-complete` exists; a dir without it was left by
a killed build and is removed and rebuilt.
"""
from __future__ import annotations

import collections
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.errors import BuildError

log = logging.getLogger(__name__)

FORMAT_VERSION = "berth-venv-1"
MARKER = ".berth-complete"
BUILD_TIMEOUT = 1800.0      # a pip that hangs this long is killed and the build failed
TAIL_LINES = 12

LineSink = Callable[[str], None]

_builds: set[subprocess.Popen[str]] = set()   # running build steps, killed at shutdown
_builds_lock = threading.Lock()
_versions: dict[str, str] = {}
_versions_lock = threading.Lock()


def python_version(python: str) -> str:
    """`cpython-3.11.7` for an interpreter path; asked once per path."""
    with _versions_lock:
        if python not in _versions:
            code = ("import sys; print(sys.implementation.name + '-' + "
                    "'.'.join(map(str, sys.version_info[:3])))")
            try:
                out = subprocess.run([python, "-c", code], capture_output=True,
                                     text=True, check=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                raise BuildError(f"cannot run interpreter {python}: {exc}",
                                 "check the runner setting `python`") from exc
            _versions[python] = out.stdout.strip()
        return _versions[python]


def venv_key(requirements: bytes, version: str) -> str:
    digest = hashlib.sha256()
    for part in (FORMAT_VERSION.encode(), version.encode(), requirements):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass
class Venv:
    key: str
    path: Path
    reused: bool
    seconds: float

    @property
    def bin(self) -> Path:
        return self.path / "bin"


class VenvCache:
    def __init__(self, root: Path, python: str) -> None:
        self.root = root
        self.python = python

    def ensure(self, requirements: Path, sink: LineSink) -> Venv:
        """Build or reuse the venv for a requirements file (missing file = none)."""
        started = time.monotonic()
        reqs = requirements.read_bytes() if requirements.is_file() else b""
        version = python_version(self.python)
        key = venv_key(reqs, version)
        path = self.root / key
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)    # waits while another runner builds it
            try:
                if (path / MARKER).exists():
                    sink(f"-----> Reusing virtualenv {key[:12]} ({version})")
                    return Venv(key, path, True, time.monotonic() - started)
                if path.exists():
                    sink(f"-----> Removing incomplete virtualenv {key[:12]}")
                    shutil.rmtree(path)
                sink(f"-----> Making virtualenv {key[:12]} ({version})")
                try:
                    self._build(path, requirements if reqs else None, sink)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                (path / MARKER).write_text(f"{version}\n")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        seconds = time.monotonic() - started
        sink(f"-----> Virtualenv ready in {seconds:.1f}s")
        return Venv(key, path, False, seconds)

    def _build(self, path: Path, requirements: Path | None, sink: LineSink) -> None:
        run_streaming([sys.executable, "-m", "virtualenv", "--quiet", "-p", self.python,
                       str(path)], sink, "virtualenv")
        if requirements is None:
            sink("-----> No requirements.txt; nothing to install")
            return
        sink("-----> Installing requirements.txt")
        run_streaming([str(path / "bin" / "python"), "-m", "pip", "install",
                       "--disable-pip-version-check", "-r", str(requirements)],
                      sink, "pip install -r requirements.txt", cwd=requirements.parent)


def run_streaming(args: list[str], sink: LineSink, what: str,
                  cwd: Path | None = None, timeout: float = BUILD_TIMEOUT) -> None:
    """Run a command, passing each output line (stdout and stderr merged) to sink.

    Raises BuildError carrying the last lines when it fails or runs past `timeout`.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", bufsize=1,
                                start_new_session=True)
    except OSError as exc:
        raise BuildError(f"{what} could not start: {exc}",
                         "check the runner setting `python`") from exc
    with _builds_lock:
        _builds.add(proc)
    timer = threading.Timer(timeout, _kill_group, (proc,))
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            sink(line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        with _builds_lock:
            _builds.discard(proc)
    if code != 0:
        last = "\n".join(tail)
        why = f"killed after {timeout:.0f}s" if code < 0 else f"exit {code}"
        raise BuildError(f"{what} failed ({why}):\n{last}",
                         "check requirements.txt; the whole output is in the build log")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_builds() -> None:
    """Kill build steps still running (runner shutdown); their venvs have no marker
    and are rebuilt on next use."""
    with _builds_lock:
        for proc in list(_builds):
            if proc.poll() is None:
                _kill_group(proc)


_control_socket: dict[Path, bool] = {}


def has_control_socket(venv: Path) -> bool:
    """Whether the venv's gunicorn knows --control-socket (gunicorn >= 25.1)."""
    if venv not in _control_socket:
        found = False
        for config in glob.glob(str(venv / "lib" / "python*" / "site-packages" /
                                    "gunicorn" / "config.py")):
            try:
                found = found or "control_socket" in Path(config).read_text(errors="replace")
            except OSError:
                pass
        _control_socket[venv] = found
    return _control_socket[venv]
