"""Per-app virtualenvs, keyed by what they contain, and the shared wheel cache.

Key = sha256(format version + python version + requirements.txt bytes); an app's
venvs live in its own directory and are reused by its later releases while the key
holds. Whoever builds holds an flock in the runner's own locks dir (never a file the
app could have planted). A venv is complete only once `.berth-complete` exists; a dir
without it was left by a killed build and is removed and rebuilt.
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
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from runner.errors import BuildError

log = logging.getLogger(__name__)

FORMAT_VERSION = "berth-venv-1"
MARKER = ".berth-complete"
BUILD_TIMEOUT = 1800.0      # a pip that hangs this long is killed and the build failed
TAIL_LINES = 12
# what a build may see of the runner's environment: how to reach the package index
PASSED_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "http_proxy",
              "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
              "SSL_CERT_FILE", "SSL_CERT_DIR")

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


Wrap = Callable[[list[str], tuple[Path, ...]], list[str]]


def unwrapped(command: list[str], writable: tuple[Path, ...] = ()) -> list[str]:
    return list(command)


@dataclass
class BuildContext:
    """Where one app builds and how its commands are run (as its user, jailed)."""
    venvs: Path                     # the app's own venv dir
    cache: Path                     # pip's cache and HOME for the build
    wrap: Wrap = unwrapped          # runs a command as the app's user
    fetch_wrap: Wrap = unwrapped    # runs the wheel download as an unprivileged user
    fetch_owner: tuple[int, int] | None = None   # who owns the download's staging dir


class VenvBuilder:
    """Per-app virtualenvs, installed from a shared read-only wheel cache.

    No venv is shared between apps: each is made by the app's own user inside its own
    directory. What is shared is `wheel_dir`, a cache of wheels that only the platform
    writes and that holds only wheels downloaded from the package index for plain
    `name<op>version` requirements (`pip download --only-binary=:all:`, which runs no
    package code): nothing a tenant uploads or builds ever enters it. A build tries
    the cache alone first (`--no-index`), then fills the cache and tries again, and
    only then lets pip reach the index itself, as the app's user, with its own cache.
    """

    def __init__(self, wheel_dir: Path, python: str, locks_dir: Path) -> None:
        self.wheel_dir = wheel_dir
        self.python = python
        self.locks_dir = locks_dir
        self.app_data = wheel_dir / "virtualenv-app-data"
        self._seed_lock = threading.Lock()

    def ensure(self, ctx: BuildContext, requirements: Path, sink: LineSink,
               python: str | None = None) -> Venv:
        """Build or reuse the app's venv for a requirements file (missing file = none),
        from `python` (an interpreter path; None = the runner's default)."""
        started = time.monotonic()
        python = python or self.python
        reqs = requirements.read_bytes() if requirements.is_file() else b""
        version = python_version(python)
        key = venv_key(reqs, version)
        path = ctx.venvs / key
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        lock_name = hashlib.sha256(str(path).encode()).hexdigest()[:32]
        with open(self.locks_dir / f"{lock_name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)    # waits while another job builds it
            try:
                if (path / MARKER).exists():
                    sink(f"-----> Reusing virtualenv {key[:12]} ({version})")
                    return Venv(key, path, True, time.monotonic() - started)
                if os.path.lexists(path):
                    sink(f"-----> Removing incomplete virtualenv {key[:12]}")
                    shutil.rmtree(path)
                sink(f"-----> Making virtualenv {key[:12]} ({version})")
                try:
                    self._build(ctx, path, requirements if reqs else None, sink, python)
                    # written by the app's user: the venv is its, links in it included
                    run_streaming(ctx.wrap(["sh", "-c", 'echo "$1" > "$2"', "sh", version,
                                            str(path / MARKER)], (ctx.venvs,)),
                                  sink, "marking the virtualenv complete")
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        seconds = time.monotonic() - started
        sink(f"-----> Virtualenv ready in {seconds:.1f}s")
        return Venv(key, path, False, seconds)

    def _build(self, ctx: BuildContext, path: Path, requirements: Path | None,
               sink: LineSink, python: str) -> None:
        self._seed_app_data(python)
        run_streaming(ctx.wrap([sys.executable, "-m", "virtualenv", "--quiet",
                                "--app-data", str(self.app_data), "--read-only-app-data",
                                "-p", python, str(path)], (ctx.venvs,)),
                      sink, "virtualenv")
        if requirements is None:
            sink("-----> No requirements.txt; nothing to install")
            return
        env = {"HOME": str(ctx.cache), "PIP_CACHE_DIR": str(ctx.cache / "pip")}
        pip = [str(path / "bin" / "python"), "-m", "pip", "install",
               "--disable-pip-version-check", "-r", str(requirements)]
        offline = [*pip, "--no-index", "--find-links", str(self.wheel_dir)]
        writable = (ctx.venvs, ctx.cache)
        sink("-----> Installing requirements.txt from the wheel cache")
        for attempt in ("cache", "fetched"):
            quiet: list[str] = []
            try:
                run_streaming(ctx.wrap(offline, writable), quiet.append,
                              "pip install from the wheel cache", cwd=requirements.parent,
                              env=env)
                for line in quiet:
                    if line.startswith("Successfully installed"):
                        sink(line)
                return
            except BuildError:
                if attempt == "fetched":
                    break
            sink("-----> Fetching wheels the cache lacks from the package index")
            self._fetch_wheels(ctx, requirements, sink)
        sink("-----> Installing requirements.txt from the package index "
             "(some need more than the wheel cache has)")
        run_streaming(ctx.wrap(pip, writable), sink, "pip install -r requirements.txt",
                      cwd=requirements.parent, env=env)

    def _fetch_wheels(self, ctx: BuildContext, requirements: Path, sink: LineSink) -> None:
        specs = plain_requirements(requirements.read_text(errors="replace"))
        if not specs:
            return
        self.wheel_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.wheel_dir))
        try:
            if ctx.fetch_owner is not None:
                os.chown(staging, *ctx.fetch_owner)
            fetch = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                     "--no-cache-dir", "--only-binary=:all:", "-d", str(staging), *specs]
            try:
                run_streaming(ctx.fetch_wrap(fetch, (staging,)), lambda _line: None,
                              "pip download", env={"HOME": str(staging)})
            except BuildError as exc:
                sink(f"       (not every requirement has a wheel: {exc.message.splitlines()[-1]})")
            for wheel in staging.iterdir():
                if wheel.name.endswith(".whl") and wheel.is_file() and not wheel.is_symlink():
                    if os.geteuid() == 0:
                        os.chown(wheel, 0, 0, follow_symlinks=False)
                    wheel.chmod(0o644)
                    os.replace(wheel, self.wheel_dir / wheel.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _seed_app_data(self, python: str) -> None:
        """virtualenv's app data (its seed wheels and, per interpreter, what it learnt
        of it), made once per interpreter by the platform and then used read-only by
        every app's user."""
        seeded = self.app_data / f".berth-seeded-{hashlib.sha256(python.encode()).hexdigest()[:12]}"
        with self._seed_lock:
            if seeded.exists():
                return
            self.app_data.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                run_streaming([sys.executable, "-m", "virtualenv", "--quiet", "--app-data",
                               str(self.app_data), "-p", python, f"{tmp}/v"],
                              lambda _line: None, "seeding virtualenv's app data")
            for root, dirs, files in os.walk(self.app_data):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o755)
                for name in files:
                    os.chmod(os.path.join(root, name), 0o644 | (
                        os.stat(os.path.join(root, name)).st_mode & 0o111))
            self.wheel_dir.chmod(0o755)
            seeded.write_text("")


def plain_requirements(text: str) -> list[str]:
    """The requirement lines that name a package from the index and nothing else:
    no options, URLs, paths or editable installs (those are left to the app's own pip)."""
    specs = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.url is None:
            specs.append(str(req))
    return specs


def run_streaming(args: list[str], sink: LineSink, what: str,
                  cwd: Path | None = None, timeout: float = BUILD_TIMEOUT,
                  env: dict[str, str] | None = None) -> None:
    """Run a command, passing each output line (stdout and stderr merged) to sink.

    Raises BuildError carrying the last lines when it fails or runs past `timeout`.
    """
    # a build runs the tenant's code: it gets a clean environment, never the runner's
    # own (which holds its token)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           **{k: v for k, v in os.environ.items() if k in PASSED_ENV}, **(env or {})}
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
