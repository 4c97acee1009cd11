"""The runner's side of its host's static file server (runner/static.py): the
listening socket, the child process, and which releases' static roots it holds.

Called from the runner's loop only, and never blocking: the child is polled, the
control socket is non-blocking (messages wait in an outbox when it is full), and
opening a root is a handful of openat calls on local directories.

- The listening socket is made once, on the runner's address and `static_port` (0:
  the kernel picks), and inherited by every child: a restart keeps the port. While
  no child runs (it died; the next start waits a backoff, 0.2 s doubling to 10 s),
  the runner accepts and closes what arrives, so a balancer sees the connection end
  at once, retries elsewhere and, every static server failing, asks the app itself;
  heartbeats meanwhile carry no static port, so routes stop naming this host.
- Each root is `<apps_dir>/<app>/releases/<sha>/.berth/static`, opened here as root
  with an O_NOFOLLOW walk from apps_dir, every component below the app's dir owned
  by the app dir's owner, and handed to the child as a directory fd (SCM_RIGHTS on a
  SOCK_SEQPACKET pair). The child drops to `nobody` first thing, so it reads only
  what it was handed, and only what `nobody` may read in there (collectstatic leaves
  0644 files in 0755 dirs).
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runner import staticfiles

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]      # where `python -m runner.static` runs
BACKOFF_START = 0.2
BACKOFF_MAX = 10.0
STABLE = 30.0           # a child up this long starts the backoff over
REFUSE_PER_STEP = 256   # connections closed per loop step while no child runs
STOP_WAIT = 3.0

Key = tuple[str, int]   # (app, release version)


@dataclass
class Held:
    fd: int             # the runner's own fd of the root (re-sent to every new child)
    prefix: str         # its URL prefix (STATIC_URL)


class StaticSupervisor:
    def __init__(self, address: str, port: int, apps_dir: Path,
                 user: tuple[int, int] | None, python: str = sys.executable) -> None:
        self.address = address
        self.wanted_port = port
        self.apps_dir = apps_dir
        self.user = user
        self.python = python
        self.port = 0
        self.listen: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.roots: dict[Key, Held] = {}
        self._missing: dict[Key, Path] = {}         # asked for, not there: not walked again
        self.backoff = BACKOFF_START
        self.started_at = 0.0
        self.restart_at = 0.0
        self.restarts = 0

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, self.wanted_port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        sock.setblocking(False)
        self.listen = sock
        self.port = int(sock.getsockname()[1])
        self._spawn(now)

    @property
    def up_port(self) -> int | None:
        """The port while a child serves it (what heartbeats advertise), else None."""
        return self.port if self.proc is not None and self.proc.poll() is None else None

    def served(self) -> dict[str, dict[int, str]]:
        """{app: {version: prefix}} of the roots the child holds (for heartbeats)."""
        out: dict[str, dict[int, str]] = {}
        for (app, version), held in self.roots.items():
            out.setdefault(app, {})[version] = held.prefix
        return out

    def close(self) -> None:
        """Stop the child (its control socket closing is its signal to go) and let go
        of every fd."""
        proc = self.proc
        self._drop_child()
        if proc is not None:
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WAIT)
        for held in self.roots.values():
            os.close(held.fd)
        self.roots.clear()
        if self.listen is not None:
            self.listen.close()
            self.listen = None

    # ---- the loop's part -------------------------------------------------------------
    def step(self, now: float) -> bool:
        """Watch the child, restart it when due, send what waits; True when whether it
        serves changed (the caller heartbeats)."""
        if self.listen is None:
            return False
        changed = False
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            up_for = now - self.started_at
            self._drop_child()
            self.backoff = BACKOFF_START if up_for >= STABLE else min(
                BACKOFF_MAX, self.backoff * 2)
            self.restart_at = now + self.backoff
            log.warning("static file server exited; restarting it",
                        extra={"code": code, "up_seconds": round(up_for, 1),
                               "backoff": self.backoff})
            changed = True
        if self.proc is None:
            self._refuse_waiting()
            if now >= self.restart_at:
                self._spawn(now)
                self.restarts += 1
                changed = True
        self._flush()
        return changed

    def want(self, wanted: dict[Key, tuple[Path, str]]) -> bool:
        """Hold exactly the roots of `wanted` ({(app, version): (static dir, URL
        prefix)}); True when that changed what the child serves."""
        changed = False
        for key in [k for k in self.roots if k not in wanted]:
            held = self.roots.pop(key)
            os.close(held.fd)
            self._queue({"op": "drop", "app": key[0], "version": key[1]})
            changed = True
        for key in list(self._missing):
            entry = wanted.get(key)
            if entry is None or entry[0] != self._missing[key]:
                del self._missing[key]
        for key, (path, prefix) in wanted.items():
            if key in self.roots or key in self._missing:
                continue
            fd = self._open_root(key[0], path)
            if fd is None:
                self._missing[key] = path
                continue
            self.roots[key] = Held(fd, prefix)
            self._queue({"op": "add", "app": key[0], "version": key[1]}, fd)
            changed = True
        return changed

    # ---- inside ----------------------------------------------------------------------
    def _open_root(self, app: str, path: Path) -> int | None:
        """The static dir of one release, walked from apps_dir with O_NOFOLLOW: every
        component from the app's dir down a directory owned by the app dir's owner."""
        try:
            parts = path.relative_to(self.apps_dir / app).parts
        except ValueError:
            log.warning("static dir outside the app's dir; not served",
                        extra={"app": app, "path": str(path)})
            return None
        try:
            top = os.open(self.apps_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            app_fd = staticfiles.open_dirs(top, [app])
            try:
                return staticfiles.open_dirs(app_fd, list(parts), os.fstat(app_fd).st_uid)
            finally:
                os.close(app_fd)
        except staticfiles.NotFound:
            return None
        finally:
            os.close(top)

    def _spawn(self, now: float) -> None:
        assert self.listen is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [self.python, "-m", "runner.static", "--listen-fd", str(self.listen.fileno()),
                "--control-fd", str(theirs.fileno())]
        if self.user is not None:
            argv += ["--user", str(self.user[0]), "--group", str(self.user[1])]
        try:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         pass_fds=(self.listen.fileno(), theirs.fileno()),
                                         start_new_session=True)
        except OSError as exc:
            ours.close()
            self.restart_at = now + BACKOFF_MAX
            log.error("cannot start the static file server: %s", exc)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.started_at = now
        self._clear_outbox()
        for (app, version) in self.roots:
            self._queue({"op": "add", "app": app, "version": version},
                        self.roots[(app, version)].fd)
        self._queue({"op": "serve"})
        log.info("static file server started", extra={"pid": self.proc.pid,
                                                      "port": self.port})

    def _drop_child(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        self.proc = None
        self._clear_outbox()

    def _queue(self, msg: dict[str, object], fd: int | None = None) -> None:
        if self.control is None:
            return          # the next child gets every root at its start
        self.outbox.append((json.dumps(msg).encode(), [os.dup(fd)] if fd is not None else []))

    def _flush(self) -> None:
        while self.outbox and self.control is not None:
            data, fds = self.outbox[0]
            try:
                socket.send_fds(self.control, [data], fds)
            except BlockingIOError:
                return              # the child is behind; the rest goes next step
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED):
                    log.warning("static server control: %s", exc)
                return              # it is dying: step() restarts it and resends
            self.outbox.popleft()
            for fd in fds:
                os.close(fd)

    def _clear_outbox(self) -> None:
        while self.outbox:
            for fd in self.outbox.popleft()[1]:
                os.close(fd)

    def _refuse_waiting(self) -> None:
        assert self.listen is not None
        for _ in range(REFUSE_PER_STEP):
            try:
                conn, _ = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.close()
