"""One PgBouncer in front of one dedicated cluster: transaction pooling, SCRAM.

Layout under `root` (the server user's, 0700): `pgbouncer.ini`, `userlist.txt` (the
tenant's SCRAM verifier, the same one the server holds: PgBouncer checks the client's
SCRAM proof against it and logs in to PostgreSQL with the keys the client proved,
so no password in clear is stored anywhere), `pgbouncer.pid`, `pgbouncer.log`.
It reaches PostgreSQL over the cluster's unix socket (it runs as the same system user
as postgres, who alone may enter that directory). PgBouncer refuses to run as root.

Transaction pooling: a server connection is the client's for one transaction, so
many app processes share few PostgreSQL backends; session state (SET, prepared
statements by name, LISTEN, advisory locks held across transactions) does not last
between transactions. Apps that need it use the direct URL (DATABASE_DIRECT_URL).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from messaging.shapes import ServiceSpec

from .command import RunAs, program_path, run
from .errors import CommandFailed, ServerUnavailable
from .files import own_dir, write_file
from .pidfile import read_pid, terminate
from .ports import listening

log = logging.getLogger(__name__)

PGBOUNCER = "/usr/sbin/pgbouncer"


class PgBouncer:
    def __init__(self, root: Path, address: str, port: int, *, user: RunAs,
                 socket_dir: Path | str, pg_port: int, pool_size: int = 20,
                 max_clients: int = 200, program: str = PGBOUNCER,
                 settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.address = address
        self.port = port
        self.user = user
        self.socket_dir = socket_dir
        self.pg_port = pg_port
        self.pool_size = pool_size
        self.max_clients = max_clients
        self.program = program
        self.settings = settings or {}      # more [pgbouncer] lines (the ha plan's)
        self.ini = root / "pgbouncer.ini"
        self.userlist = root / "userlist.txt"
        self.pid_file = root / "pgbouncer.pid"
        self.log_file = root / "pgbouncer.log"

    def service(self, service_id: str, addon_id: str) -> ServiceSpec:
        """PgBouncer in the foreground (no -d), for a runner to supervise; it logs to
        its own logfile."""
        return ServiceSpec(id=service_id, addon=addon_id, app="", kind="pgbouncer",
                           argv=(program_path(self.program), str(self.ini)),
                           cwd=str(self.root),
                           user=self.user.name, address=self.address, port=self.port,
                           pidfile=str(self.pid_file))

    def configure(self, database: str, role: str, verifier: str) -> None:
        """Write the ini and the user list; a running PgBouncer re-reads both."""
        own_dir(self.root, self.user)
        write_file(self.userlist, f'"{role}" "{verifier}"\n', self.user)
        write_file(self.ini, self._ini(database), self.user)
        self.reload()

    def point(self, database: str) -> None:
        """Rewrite the ini (its [databases] entry now this object's host and port)
        and reload: SIGHUP, what the admin console's RELOAD does. PgBouncer closes the
        server connections of a database whose entry changed; its clients stay."""
        write_file(self.ini, self._ini(database), self.user)
        self.reload()

    def _ini(self, database: str) -> str:
        return "\n".join([
            "; written by Berth (dbprovision/pgbouncer.py)",
            "[databases]",
            f"{database} = host={self.socket_dir} port={self.pg_port} dbname={database}",
            "[pgbouncer]",
            f"listen_addr = {self.address}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.userlist}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            f"max_client_conn = {self.max_clients}",
            "ignore_startup_parameters = extra_float_digits,options",
            "server_reset_query =",
            f"logfile = {self.log_file}",
            f"pidfile = {self.pid_file}",
            "admin_users =",
            "stats_users =",
            *(f"{k} = {v}" for k, v in self.settings.items()),
        ]) + "\n"

    def start(self, timeout: float = 10) -> None:
        if self.is_running():
            return
        self.pid_file.unlink(missing_ok=True)
        try:
            run([self.program, "-d", self.ini], timeout=timeout, user=self.user, cwd=self.root)
        except CommandFailed as exc:
            raise ServerUnavailable(f"PgBouncer in {self.root} did not start: {exc.message}",
                                    f"see {self.log_file}") from exc
        started = time.monotonic()
        while not (self.is_running() and listening(self.address, self.port)):
            now = time.monotonic()
            # it binds after daemonizing: a taken port shows as a PgBouncer that is gone
            if now - started > timeout or (now - started > 0.5 and not self.is_running()):
                raise ServerUnavailable(f"PgBouncer on port {self.port} did not start: "
                                        f"{self._log_tail()}", f"see {self.log_file}")
            time.sleep(0.005)
        log.info("pgbouncer started", extra={"dir": str(self.root), "port": self.port,
                                             "pid": self.pid()})

    def reload(self) -> None:
        pid = self.pid()
        if pid is not None and self._is_ours(pid):
            os.kill(pid, signal.SIGHUP)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM by PID (an immediate shutdown: clients are cut, the server behind
        finishes or rolls back their transactions)."""
        pid = self.pid()
        if pid is None or not self._is_ours(pid):
            return
        terminate(pid, self._is_ours, timeout)
        log.info("pgbouncer stopped", extra={"dir": str(self.root), "pid": pid})

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and self._is_ours(pid)

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(text[-lines:])

    def _is_ours(self, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        return b"pgbouncer" in cmdline and os.fsencode(self.ini) in cmdline
