"""Instances a killed runner left running, taken over by the next one.

Static stability: a runner that dies (kill -9, a crash, an upgrade gone wrong) takes
nothing with it. Its instances run in their own sessions and keep serving; the routes
still point at them. The next runner on the same data dir adopts every instance that
is still whole instead of ending and restarting it:

- **What it was.** When an instance is spawned, its record (`instance.json` in its
  instance dir, root's, 0600: the spec with its config, port, pid, paths, restarts)
  is written next to it. A record is what makes an instance adoptable.
- **Is it still the same process?** The record's pid must be alive (not a zombie),
  lead its own process group and carry the instance's `BERTH_INSTANCE` in its
  environment, checked after a pidfd is opened on it, so a reused pid is never
  taken for the instance. The pidfd then tells when it exits (it is no longer our
  child: its exit status goes to init, not to us).
- **Its output.** Instances write to pipes whose read ends they also hold (see
  `ProcessOps.spawn`): when the runner dies the pipes stay open, writes wait in the
  pipe (up to `PIPE_SIZE`) instead of failing with EPIPE, and the new runner opens
  `/proc/<pid>/fd/1` and `/2` (Linux opens a pipe's other end through them) and
  reads on from the first unread byte.

Whatever is not adoptable (no record, the leader gone, a one-off run) is ended by
runner/leftovers.py as before.
"""
from __future__ import annotations

import json
import logging
import os
import select
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from messaging.errors import ProtocolError
from messaging.manifest import Manifest

log = logging.getLogger(__name__)

RECORD = "instance.json"
VERSION = 1


@dataclass(frozen=True)
class Record:
    """What the runner needs to take an instance over, as it was when spawned."""
    instance: str
    app: str
    release: int
    proc: str
    command: str
    env: dict[str, str]
    slug: str
    slug_url: str
    host_header: str | None
    memory_mb: int | None
    pids_max: int | None
    manifest: dict[str, Any]
    pid: int
    port: int | None
    generation: int
    restarts: int
    release_dir: str
    venv_bin: str
    data_dir: str | None
    control_socket: bool
    static: tuple[str, str] | None      # (collected static dir, URL prefix)

    def write(self, instance_dir: Path) -> None:
        """Atomically, readable by root alone (the config vars are in it)."""
        tmp = instance_dir / f".{RECORD}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"v": VERSION, **asdict(self)}, fh)
        os.replace(tmp, instance_dir / RECORD)

    @classmethod
    def read(cls, instance_dir: Path) -> Record | None:
        try:
            data = json.loads((instance_dir / RECORD).read_text())
            if data.pop("v", None) != VERSION:
                return None
            static = data.get("static")
            record = cls(**{**data, "static": tuple(static) if static else None})
            Manifest.from_wire(record.manifest)
        except (OSError, ValueError, TypeError, ProtocolError):
            return None
        if record.instance != instance_dir.name or not isinstance(record.pid, int) \
                or record.pid <= 1:
            return None
        return record


class AdoptedProcess:
    """A process a previous runner started, watched through a pidfd. It quacks like
    the subprocess.Popen the supervisor knows (pid, poll, wait, stdout, stderr),
    but its exit status is unknown: wait() returns None."""

    def __init__(self, pid: int, pidfd: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None
        self._exited = False

    def _wait_exit(self, timeout: float) -> bool:
        if not self._exited:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            if poller.poll(max(0, int(timeout * 1000))):
                self._exited = True
                os.close(self.pidfd)
        return self._exited

    def poll(self) -> int | None:
        self._wait_exit(0)
        return self.returncode

    def exited(self) -> bool:
        return self._wait_exit(0)

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._wait_exit(1.0 if deadline is None
                                  else min(1.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"pid {self.pid} still running")
        return self.returncode


def _environ_has(pid: int, instance: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"BERTH_INSTANCE={instance}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def take(record: Record) -> AdoptedProcess | None:
    """The record's process, if it is still the instance's leader and whole."""
    pid = record.pid
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        # checked after the pidfd pins the process: a reused pid fails here
        if _zombie(pid) or not _environ_has(pid, record.instance) \
                or os.getpgid(pid) != pid:
            raise ProcessLookupError(pid)
        stdout = open(f"/proc/{pid}/fd/1", "rb")
        try:
            stderr = open(f"/proc/{pid}/fd/2", "rb")
        except OSError:
            stdout.close()
            raise
    except OSError:
        os.close(pidfd)
        return None
    return AdoptedProcess(pid, pidfd, stdout, stderr)


def find(instances_dir: Path) -> list[tuple[Record, AdoptedProcess]]:
    """Every instance of a previous runner here that can be taken over."""
    found: list[tuple[Record, AdoptedProcess]] = []
    if not instances_dir.is_dir():
        return found
    for path in sorted(instances_dir.iterdir()):
        if not path.is_dir() or path.name.startswith("run-"):
            continue
        record = Record.read(path)
        if record is None:
            continue
        proc = take(record)
        if proc is None:
            log.info("a previous instance is gone or not whole; not adopting it",
                     extra={"app": record.app, "instance": record.instance,
                            "release": record.release, "pid": record.pid})
            continue
        found.append((record, proc))
    return found
