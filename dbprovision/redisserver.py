"""One redis-server in a directory: its config file and ACL file (written by us), start,
stop by PID, readiness, and the platform's admin connection.

Layout under `root` (the server user's, 0700): `redis.conf`, `users.acl` (ACL users:
`default` off, `berth-admin` with every right, and whatever tenants `acl_users` holds),
`redis.sock` (mode 0700: the admin's way in, as root), `redis.pid`, `redis.log`, and
the data: AOF (`appendonly/`) and RDB (`dump.rdb`). The server daemonizes and writes
its PID file, so it outlives the process that started it (a Celery job) and the next
one stops it by that PID. As root it runs as `user` (the `redis` system user of
Debian's package), never as root.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from messaging.shapes import ServiceSpec

from .command import RunAs, program_path, run
from .errors import CommandFailed, ServerUnavailable
from .files import check_socket_path, own_dir, write_file
from .pidfile import read_pid, terminate

log = logging.getLogger(__name__)

ADMIN = "berth-admin"
REDIS_SERVER = "redis-server"


def default_user() -> RunAs:
    return RunAs.lookup("redis") if os.geteuid() == 0 else RunAs.current()


def acl_password(password: str) -> str:
    """An ACL file's `#<sha256>` form: the file never holds a password in clear."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


class RedisServer:
    def __init__(self, root: Path, address: str, port: int, *, user: RunAs | None = None,
                 maxmemory_mb: int = 256, policy: str = "noeviction",
                 program: str = REDIS_SERVER,
                 extra: Sequence[tuple[str, str]] = ()) -> None:
        self.root = root
        self.extra = list(extra)        # more redis.conf lines (replication, ha plan)
        self.address = address
        self.port = port
        self.user = user or default_user()
        self.maxmemory_mb = maxmemory_mb
        self.policy = policy
        self.program = program
        self.conf = root / "redis.conf"
        self.acl_file = root / "users.acl"
        self.socket = root / "redis.sock"
        self.pid_file = root / "redis.pid"
        self.log_file = root / "redis.log"
        self.secret_file = root / "admin.secret"

    # -- files -----------------------------------------------------------------

    def configured(self) -> bool:
        return self.conf.exists() and self.secret_file.exists() and self.acl_file.exists()

    def configure(self, acl_users: Sequence[str] = ()) -> None:
        """Write redis.conf and (only when missing) users.acl with `acl_users` lines
        (`user <name> <rules>`) beside the admin's and the disabled default user's."""
        check_socket_path(self.socket)
        own_dir(self.root, self.user)
        if not self.secret_file.exists():
            write_file(self.secret_file, secrets.token_urlsafe(32), RunAs.current())
        if not self.acl_file.exists():
            lines = ["user default off resetpass resetkeys resetchannels -@all",
                     f"user {ADMIN} on {acl_password(self.admin_password())} ~* &* +@all",
                     *acl_users]
            write_file(self.acl_file, "\n".join(lines) + "\n", self.user)
        write_file(self.conf, self._conf(), self.user)

    def admin_password(self) -> str:
        return self.secret_file.read_text().strip()

    def _conf(self) -> str:
        values = [
            ("bind", self.address), ("port", str(self.port)), ("protected-mode", "yes"),
            ("unixsocket", str(self.socket)), ("unixsocketperm", "700"),
            ("daemonize", "yes"), ("pidfile", str(self.pid_file)),
            ("logfile", str(self.log_file)), ("dir", str(self.root)),
            ("aclfile", str(self.acl_file)),
            ("appendonly", "yes"), ("appenddirname", '"appendonly"'),
            ("appendfsync", "everysec"),
            ("maxmemory", f"{self.maxmemory_mb}mb"), ("maxmemory-policy", self.policy),
            ("enable-debug-command", "no"), ("enable-module-command", "no"),
            ("enable-protected-configs", "no"), ("timeout", "0"),
            ("tcp-keepalive", "300"), ("supervised", "no"), *self.extra,
        ]
        return "# written by Berth (dbprovision/redisserver.py)\n" + \
            "".join(f"{k} {v}\n" for k, v in values)

    # -- life cycle ---------------------------------------------------------------

    def service(self, service_id: str, addon_id: str) -> ServiceSpec:
        """redis-server in the foreground, for a runner to supervise (SIGTERM: it
        writes its AOF and exits); it logs to its own logfile."""
        return ServiceSpec(id=service_id, addon=addon_id, app="", kind="redis",
                           argv=(program_path(self.program), str(self.conf), "--daemonize",
                                 "no"),
                           cwd=str(self.root), user=self.user.name, address=self.address,
                           port=self.port, pidfile=str(self.pid_file))

    def start(self, timeout: float = 10) -> None:
        if self.is_running():
            return
        self.pid_file.unlink(missing_ok=True)
        offset = self._log_size()
        try:
            run([self.program, self.conf], timeout=timeout, user=self.user, cwd=self.root)
        except CommandFailed as exc:
            raise ServerUnavailable(f"redis-server in {self.root} did not start: "
                                    f"{self._log_tail() or exc.message}",
                                    f"see {self.log_file}") from exc
        self.wait_ready(timeout, log_offset=offset)
        log.info("redis started", extra={"dir": str(self.root), "port": self.port,
                                         "pid": self.pid()})

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM by PID (redis writes its AOF and exits), SIGKILL after `timeout`."""
        pid = self.pid()
        if pid is None or not self._is_ours(pid):
            return
        terminate(pid, self._is_ours, timeout)
        log.info("redis stopped", extra={"dir": str(self.root), "pid": pid})

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and self._is_ours(pid)

    def is_ready(self) -> bool:
        try:
            with self.admin(timeout=1) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def wait_ready(self, timeout: float = 10, *, log_offset: int | None = None) -> None:
        """Until it answers PING. The daemon binds after it has left its parent, so a
        port already taken shows only in its log ("... aborting."): read from
        `log_offset`, that fails at once instead of at the deadline."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if log_offset is not None and "aborting" in self._log_since(log_offset):
                raise ServerUnavailable(f"redis-server in {self.root} did not start: "
                                        f"{self._log_tail(2)}", f"see {self.log_file}")
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"redis-server in {self.root} does not answer: "
                                        f"{self._log_tail()}", f"see {self.log_file}")
            time.sleep(0.005)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def admin(self, timeout: float = 5, *, decode: bool = True) -> redis.Redis:
        """The platform's connection, over the unix socket."""
        return redis.Redis(unix_socket_path=str(self.socket), username=ADMIN,
                           password=self.admin_password(), socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=decode,
                           retry=Retry(NoBackoff(), 0))     # callers decide on retries

    def _is_ours(self, pid: int) -> bool:
        """Alive, not a zombie, and redis-server started on our config (not another
        process that reused the PID)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        return b"redis-server" in cmdline and f":{self.port}".encode() in cmdline

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except (FileNotFoundError, PermissionError):
            return ""
        return " | ".join(text[-lines:])
