"""One PostgreSQL 15 cluster in a directory: initdb, start, stop, readiness, the
superuser's connection, and pg_hba.conf.

Layout under `root` (the server user's, 0700): `data/` (PGDATA, with the unix socket
in it, mode 0700: only the server's user and root reach it) and `server.log`.

Who may log in how:
- the bootstrap superuser `postgres` only over the unix socket, by peer
  authentication mapped from root and the server's own user (pg_ident map `berth`):
  no superuser password exists, and no TCP login as it is possible;
- tenants over TCP with scram-sha-256, one `host <db> <role> <clients>` line each, so a
  role reaches only its own database; any other connection finds no pg_hba.conf line
  and is refused ("no pg_hba.conf entry", SQLSTATE 28000).

initdb refuses to run as root, so as root every program of the cluster runs as
`user` (the `postgres` system user that Debian's package makes, by default).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions

from messaging.shapes import ServiceSpec

from .command import RunAs, run
from .errors import CommandFailed, ServerUnavailable
from .files import check_socket_path, own_dir, write_file

log = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
IDENT_MAP = "berth"


@dataclass(frozen=True)
class HbaRule:
    """One tenant's way in: `host <database> <role> <network> scram-sha-256`, or over
    the unix socket (`local`: PgBouncer's way, the socket being its user's alone)."""

    database: str
    role: str
    network: str = "127.0.0.0/8"
    local: bool = False

    def line(self) -> str:
        # names are quoted so none is read as a keyword (all, sameuser, replication)
        if self.local:
            return f'local "{self.database}" "{self.role}" scram-sha-256'
        return f'host "{self.database}" "{self.role}" {self.network} scram-sha-256'


def default_user() -> RunAs:
    """`postgres` as root (initdb refuses root), else whoever we are."""
    return RunAs.lookup(SUPERUSER) if os.geteuid() == 0 else RunAs.current()


class PgCluster:
    def __init__(self, root: Path, address: str, port: int, *, user: RunAs | None = None,
                 bin_dir: Path = PG_BIN, settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.log_file = root / "server.log"
        self.address = address
        self.port = port
        self.user = user or default_user()
        self.bin = bin_dir
        self.settings = settings or {}

    # -- life cycle ---------------------------------------------------------------

    def service(self, service_id: str, addon_id: str) -> ServiceSpec:
        """The postmaster in the foreground, for a runner to supervise (it adopts the
        one `start` made through postmaster.pid); SIGINT is a fast shutdown."""
        return ServiceSpec(id=service_id, addon=addon_id, app="", kind="postgres",
                           argv=(str(self.bin / "postgres"), "-D", str(self.data)),
                           cwd=str(self.root), user=self.user.name, address=self.address,
                           port=self.port, pidfile=str(self.data / "postmaster.pid"),
                           stop_signal="INT", log_file=str(self.log_file))

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb (once), then Berth's settings (re-written every time, so a changed
        address or port applies at the next start), ident map and a pg_hba.conf with
        no tenant. A half-made data dir (initdb killed) is removed and made again."""
        check_socket_path(self.data / f".s.PGSQL.{self.port}")
        own_dir(self.root, self.user)
        if not (self.initialized() and (self.data / "berth.conf").exists()):
            self._initdb()
        write_file(self.data / "berth.conf", self._conf(), self.user)

    def _initdb(self) -> None:
        if self.data.exists():
            run(["rm", "-rf", "--one-file-system", self.data], timeout=60)
        run([self.bin / "initdb", "-D", self.data, "-U", SUPERUSER, "-E", "UTF8",
             "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=reject",
             "--no-instructions"], timeout=120, user=self.user, cwd=self.root,
            hint="initdb could not make the cluster; its output above says why")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# Berth's settings (dbprovision/pgcluster.py)\ninclude = 'berth.conf'\n")
        users = sorted({"root", self.user.name, RunAs.current().name})
        write_file(self.data / "pg_ident.conf",
                   "".join(f"{IDENT_MAP} {u} {SUPERUSER}\n" for u in users), self.user)
        write_file(self.data / "berth.conf", self._conf(), self.user)
        self.write_hba([])
        log.info("cluster initialized", extra={"data": str(self.data), "port": self.port})

    def _conf(self) -> str:
        values = {
            "listen_addresses": f"'{self.address}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data}'",
            "unix_socket_permissions": "0700",
            "password_encryption": "'scram-sha-256'",
            "max_connections": "200",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            **self.settings,
        }
        return "".join(f"{k} = {v}\n" for k, v in values.items())

    def start(self, timeout: float = 30) -> None:
        if self.is_running():
            return
        try:
            run([self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.log_file, "-w",
                 "-t", str(int(timeout)), "-s"], timeout=timeout + 10, user=self.user,
                cwd=self.root)
        except CommandFailed as exc:
            raise ServerUnavailable(f"PostgreSQL in {self.data} did not start: "
                                    f"{self._log_tail() or exc.message}",
                                    f"see {self.log_file}") from exc
        log.info("cluster started", extra={"data": str(self.data), "port": self.port,
                                           "pid": self.pid()})

    def stop(self, timeout: float = 30) -> None:
        """A fast shutdown (sessions ended, no data lost), by the postmaster's PID."""
        if not self.is_running():
            return
        run([self.bin / "pg_ctl", "stop", "-D", self.data, "-m", "fast", "-w",
             "-t", str(int(timeout)), "-s"], timeout=timeout + 10, user=self.user,
            cwd=self.root)
        log.info("cluster stopped", extra={"data": str(self.data)})

    def is_running(self) -> bool:
        """The postmaster of postmaster.pid is alive (what `pg_ctl status` checks,
        without a process)."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.split(" (", 1)[1].startswith("postgres)") and \
            stat.rsplit(")", 1)[1].split()[0] != "Z"

    def is_ready(self) -> bool:
        return run([self.bin / "pg_isready", "-q", "-h", self.data, "-p", str(self.port),
                    "-t", "2"], timeout=10, check=False).returncode == 0

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"PostgreSQL on port {self.port} does not accept "
                                        f"connections", f"see {self.log_file}")
            time.sleep(0.02)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    # -- access -------------------------------------------------------------------

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True,
                timeout: int = 5) -> psycopg2.extensions.connection:
        """The superuser's connection, over the unix socket (peer, mapped)."""
        conn = psycopg2.connect(host=str(self.data), port=self.port, user=SUPERUSER,
                                dbname=dbname, connect_timeout=timeout,
                                application_name="berth-dbprovision")
        conn.autocommit = autocommit
        return conn

    def write_hba(self, rules: Sequence[HbaRule]) -> None:
        """Replace pg_hba.conf with the superuser's socket line and `rules`, then have
        the server re-read it (running or not)."""
        lines = ["# written by Berth (dbprovision/pgcluster.py): edits are overwritten.",
                 "# A connection that matches no line is refused.",
                 f"local all {SUPERUSER} peer map={IDENT_MAP}",
                 *(r.line() for r in rules)]
        write_file(self.data / "pg_hba.conf", "\n".join(lines) + "\n", self.user)
        if self.is_running():
            with closing(self.connect()) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_reload_conf()")

    def dump(self, dbname: str, path: Path, timeout: float = 600) -> None:
        """pg_dump -Fc of one database to `path` (written by root, 0600)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        run([self.bin / "pg_dump", "-Fc", "-h", self.data, "-p", str(self.port),
             "-U", SUPERUSER, "-f", path, dbname], timeout=timeout)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return " | ".join(text[-lines:])
