"""A dedicated PostgreSQL for one addon: its own cluster (initdb), its own ports, an
owner role that is not a superuser, and PgBouncer in front in transaction pooling.

Under `root` (a PgCluster's root: `data/`, `server.log`) also `bouncer/` (a PgBouncer). The
tenant's role `name` owns its database `name` (so it may create schemas and trusted
extensions, and is never blocked: the disk is its plan's); it is LOGIN and nothing
else (no SUPERUSER, CREATEROLE, REPLICATION, BYPASSRLS). pg_hba.conf has two lines
for it: `local name name scram-sha-256` (PgBouncer, over the cluster's 0700 socket
directory) and `host name name <clients> scram-sha-256` (the direct URL, for what
transaction pooling cannot carry: migrations holding session locks, LISTEN). The
superuser logs in by peer over the socket only, as on the shared cluster.

The app's DATABASE_URL points at PgBouncer; DATABASE_DIRECT_URL at PostgreSQL.
Until a runner supervises it (a later step), the cluster and PgBouncer daemonize and
`ensure_running` restarts them.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from messaging.shapes import ServiceSpec

from .command import RunAs
from .errors import ServerUnavailable
from .pgbouncer import PgBouncer
from .pgcluster import HbaRule, PgCluster, default_user

log = logging.getLogger(__name__)

SETTINGS = {"shared_buffers": "'64MB'", "max_connections": "60"}


class PgDedicated:
    def __init__(self, root: Path, address: str, pg_port: int, bouncer_port: int, *,
                 user: RunAs | None = None, clients: str = "127.0.0.0/8",
                 connection_limit: int = 40) -> None:
        self.root = root
        self.user = user or default_user()
        self.clients = clients
        self.connection_limit = connection_limit
        self.cluster = PgCluster(root, address, pg_port, user=self.user, settings=SETTINGS)
        self.bouncer = PgBouncer(root / "bouncer", address, bouncer_port, user=self.user,
                                 socket_dir=self.cluster.data, pg_port=pg_port)

    def create(self, name: str, password: str) -> None:
        """initdb and start (once), the owner role and its database, pg_hba, then
        PgBouncer; every step idempotent."""
        self.cluster.init()
        self.cluster.start()
        verifier = self._set_role(name, password)
        with closing(self.cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(name)))
            for db in ("postgres", "template1"):
                cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(db)))
        self.cluster.write_hba([HbaRule(name, name, local=True),
                                HbaRule(name, name, self.clients)])
        self.bouncer.configure(name, name, verifier)
        self.bouncer.start()

    def _set_role(self, name: str, password: str) -> str:
        """Create or update the owner role; returns the SCRAM verifier it now has."""
        with closing(self.cluster.connect()) as conn, conn.cursor() as cur:
            verifier = psycopg2.extensions.encrypt_password(password, name, conn,
                                                            "scram-sha-256")
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB "
                                "NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {} "
                                "PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(self.connection_limit),
                sql.Literal(verifier)))
        return str(verifier)

    def wait_login(self, name: str, password: str, timeout: float = 5) -> None:
        """Return once `name` logs in through PgBouncer (which logs in to PostgreSQL)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(host=self.bouncer.address, port=self.bouncer.port,
                                 user=name, password=password, dbname=name,
                                 connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"{name} cannot log in through PgBouncer: {exc}",
                                            f"see {self.bouncer.log_file} and "
                                            f"{self.cluster.log_file}") from exc
                time.sleep(0.01)

    def rotate(self, name: str, password: str) -> None:
        """A new password on the server and in PgBouncer's list (re-read at once)."""
        self.ensure_running()
        verifier = self._set_role(name, password)
        self.bouncer.configure(name, name, verifier)

    def services(self, addon_id: str) -> list[ServiceSpec]:
        """The cluster and its PgBouncer, for a runner to supervise."""
        return [self.cluster.service(f"{addon_id}-postgres", addon_id),
                self.bouncer.service(f"{addon_id}-bouncer", addon_id)]

    def ensure_running(self) -> None:
        if self.cluster.initialized():
            self.cluster.start()
            if self.bouncer.ini.exists():
                self.bouncer.start()

    def stop(self) -> None:
        self.bouncer.stop()
        self.cluster.stop()

    def usage_bytes(self, name: str) -> int:
        with closing(self.cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(%s)", (name,))
            return int(cur.fetchone()[0])

    def destroy(self, name: str, final_dump: Path | None = None) -> None:
        """pg_dump (when asked), stop both by PID, remove the directory. Idempotent."""
        if final_dump is not None and self.cluster.initialized():
            self.cluster.start()
            with closing(self.cluster.connect()) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                exists = cur.fetchone() is not None
            if exists:
                self.cluster.dump(name, final_dump)
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        log.info("dedicated postgres destroyed", extra={"dir": str(self.root)})
