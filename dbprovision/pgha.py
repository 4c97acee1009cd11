"""An ha PostgreSQL for one addon: a primary and a hot standby on two hosts (two
loopback addresses here, each node with its own data dir), PgBouncer in front of
whichever is the primary, and failover that promotes the standby, repoints PgBouncer
and fences the old primary.

Layout under `root` (`dedicated/pgha-<hash>`: short, for the unix socket path):
`a/` and `b/` (PgCluster roots, nodes `node_a` and `node_b`; a on the first
address, b on the second, both on the same port), `bouncer/` (PgBouncer, on the
provisioner's address: the app's DATABASE_URL), `ha.json` (which node is primary,
which is fenced; root's) and `replication.secret` (the replication role's password;
root's, 0600).

Replication: the standby is made with `pg_basebackup -R -S <node>` (a physical slot
per standby, so the primary keeps the WAL it has not received, bounded by
`max_slot_wal_keep_size` so a standby that is gone for long cannot fill the disk: it
loses its slot and is rebuilt). Synchronous: `synchronous_standby_names = 'ANY 1
(node_a, node_b)'` (a node never counts itself, so one setting serves both roles;
set by ALTER SYSTEM once the standby streams) with `synchronous_commit = on`: a
COMMIT returns only once the standby has flushed its WAL, so every acknowledged row
survives the primary's loss. The price: a commit waits one round trip to the standby,
and while the cluster has no standby (after a failover, until the old node is
rebuilt) the primary runs alone, asynchronous (`synchronous_standby_names = ''`, by
ALTER SYSTEM); `rejoin` rebuilds the standby
and makes it synchronous again.

Fencing: the old primary never accepts writes again. On failover it is stopped if
its postmaster still runs (pg_ctl stop -m immediate), its data dir is renamed to
`data.fenced` (no pg_ctl start finds it: `initialized()` is false) and ha.json marks
it fenced, before the standby is promoted; PgBouncer no longer points at it. `rejoin`
throws that dir away and makes the node the new standby by pg_basebackup from the new
primary. (On real hosts a dead host cannot be asked to stop; fencing there also means
the runner of that host refusing to start a node ha.json calls fenced.)
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from messaging.shapes import ServiceSpec

from .command import RunAs, run
from .errors import CommandFailed, ServerUnavailable
from .files import own_dir, write_file
from .pgbouncer import PgBouncer
from .pgcluster import HbaRule, PgCluster, default_user

log = logging.getLogger(__name__)

NODES = ("a", "b")
REPLICATOR = "berth_replicator"
SYNC_NAMES = "'ANY 1 (node_a, node_b)'"
SETTINGS = {
    "shared_buffers": "'64MB'", "max_connections": "60",
    "wal_level": "replica", "max_wal_senders": "5", "max_replication_slots": "5",
    "max_slot_wal_keep_size": "'1GB'", "wal_keep_size": "'64MB'",
    "synchronous_commit": "on",
    "hot_standby": "on", "hot_standby_feedback": "on", "wal_log_hints": "on",
    "wal_receiver_status_interval": "'1s'",
}
# a failed login to the (dead) primary is retried after 1 s, not PgBouncer's 15
BOUNCER_SETTINGS = {"server_login_retry": "1", "server_connect_timeout": "3"}


class ReplicationRule(HbaRule):
    """`host replication <role> <network> scram-sha-256` (the keyword, unquoted)."""

    def line(self) -> str:
        return f"host replication {self.role} {self.network} scram-sha-256"


class PgHa:
    def __init__(self, root: Path, addresses: tuple[str, str], pg_port: int,
                 bouncer_address: str, bouncer_port: int, *, user: RunAs | None = None,
                 clients: str = "127.0.0.0/8", connection_limit: int = 40) -> None:
        self.root = root
        self.addresses = addresses
        self.port = pg_port
        self.user = user or default_user()
        self.clients = clients
        self.connection_limit = connection_limit
        self.bouncer_address = bouncer_address
        self.bouncer_port = bouncer_port
        self.state_file = root / "ha.json"
        self.secret_file = root / "replication.secret"

    # -- nodes and state ------------------------------------------------------------

    def node(self, which: str) -> PgCluster:
        return PgCluster(self.root / which, self.address(which), self.port,
                         user=self.user, settings=SETTINGS)

    def address(self, which: str) -> str:
        return self.addresses[NODES.index(which)]

    def state(self) -> dict[str, str]:
        """{"primary": "a"|"b", "fenced": ""|"a"|"b", "sync": "on"|"off"}: "off" when
        the primary commits alone (its standby died, or was fenced); with "fenced_at"
        (UTC seconds) while a node is fenced."""
        state = {"primary": "a", "fenced": "", "sync": "on"}
        if self.state_file.exists():
            state.update(json.loads(self.state_file.read_text()))
        return state

    def _save(self, state: dict[str, str]) -> None:
        write_file(self.state_file, json.dumps(state), RunAs.current())

    def primary(self) -> str:
        return self.state()["primary"]

    def standby(self) -> str:
        return _other(self.primary())

    def bouncer(self, target: str | None = None) -> PgBouncer:
        which = target or self.primary()
        return PgBouncer(self.root / "bouncer", self.bouncer_address, self.bouncer_port,
                         user=self.user, socket_dir=self.address(which), pg_port=self.port,
                         settings=BOUNCER_SETTINGS)

    def _replication_password(self) -> str:
        if not self.secret_file.exists():
            write_file(self.secret_file, secrets.token_urlsafe(24), RunAs.current())
        return self.secret_file.read_text().strip()

    # -- create ---------------------------------------------------------------------

    def create(self, name: str, password: str) -> None:
        """The primary (initdb, roles, database, pg_hba), the standby (pg_basebackup
        -R from it, started, streaming), then PgBouncer; every step idempotent."""
        own_dir(self.root, RunAs.current(), 0o711)
        if not self.state_file.exists():
            self._save(self.state())
        primary = self.node(self.primary())
        primary.init()
        primary.start()
        verifier = self._roles(primary, name, password)
        self._standby_from(primary, self.standby())
        self._synchronous(primary, SYNC_NAMES)
        self.bouncer().configure(name, name, verifier)
        self.bouncer().start()

    def _roles(self, primary: PgCluster, name: str, password: str) -> str:
        """The owner role and its database, the replication role, pg_hba; returns the
        owner's SCRAM verifier (PgBouncer's user list)."""
        with closing(primary.connect()) as conn, conn.cursor() as cur:
            verifier = str(psycopg2.extensions.encrypt_password(password, name, conn,
                                                                "scram-sha-256"))
            repl = psycopg2.extensions.encrypt_password(self._replication_password(),
                                                        REPLICATOR, conn, "scram-sha-256")
            for role, rights, secret in (
                    (name, "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                           "NOBYPASSRLS", verifier),
                    (REPLICATOR, "LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE",
                     repl)):
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} WITH " + rights + " PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(secret)))
            cur.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
                sql.Identifier(name), sql.Literal(self.connection_limit)))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(name)))
            for db in ("postgres", "template1"):
                cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(db)))
        primary.write_hba([HbaRule(name, name, self.clients),
                           ReplicationRule("replication", REPLICATOR, self.clients)])
        return verifier

    def _standby_from(self, primary: PgCluster, which: str) -> None:
        """Make node `which` a streaming standby of `primary` (pg_basebackup -R into
        an empty dir, through its own slot), unless it is one and runs."""
        standby = self.node(which)
        slot = f"node_{which}"
        with closing(primary.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            if cur.fetchone() is None:
                cur.execute("SELECT pg_create_physical_replication_slot(%s)", (slot,))
        if not (standby.initialized() and (standby.data / "standby.signal").exists()):
            own_dir(standby.root, self.user)
            if standby.data.exists():
                run(["rm", "-rf", "--one-file-system", standby.data], timeout=60)
            conninfo = (f"host={primary.address} port={self.port} user={REPLICATOR} "
                        f"application_name={slot}")
            run([primary.bin / "pg_basebackup", "-D", standby.data, "-d", conninfo,
                 "-X", "stream", "-c", "fast", "-R", "-S", slot],
                timeout=300, user=self.user, cwd=standby.root,
                env={"PGPASSWORD": self._replication_password()},
                hint="pg_basebackup could not copy the primary; see its server.log")
            for lock in standby.data.glob(".s.PGSQL.*"):   # the primary's socket lock
                lock.unlink()
        standby.init()              # berth.conf with this node's address
        standby.start()
        self._wait_streaming(primary, slot)

    def _synchronous(self, node: PgCluster, names: str) -> None:
        """synchronous_standby_names by ALTER SYSTEM (postgresql.auto.conf, which
        pg_basebackup copies): set only once a standby streams, or commits would wait
        for one that is not there; '' while the primary is alone."""
        with closing(node.connect()) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                sql.Literal(names.strip("'"))))
            cur.execute("SELECT pg_reload_conf()")

    def _wait_streaming(self, primary: PgCluster, slot: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with closing(primary.connect()) as conn, conn.cursor() as cur:
                cur.execute("SELECT state FROM pg_stat_replication WHERE application_name "
                            "= %s", (slot,))
                row = cur.fetchone()
            if row and row[0] == "streaming":
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"the standby {slot} does not stream from the "
                                        f"primary", f"see {self.root}/[ab]/server.log")
            time.sleep(0.02)

    # -- health and failover ----------------------------------------------------------

    def check_primary(self, timeout: int = 1) -> bool:
        """The current primary accepts connections on its address (pg_isready over
        TCP, as a client on another host would see it)."""
        node = self.node(self.primary())
        return run([node.bin / "pg_isready", "-q", "-h", node.address, "-p", str(self.port),
                    "-t", str(timeout)], timeout=timeout + 5, check=False).returncode == 0

    def check_standby(self, timeout: int = 1) -> bool:
        node = self.node(self.standby())
        return run([node.bin / "pg_isready", "-q", "-h", node.address, "-p", str(self.port),
                    "-t", str(timeout)], timeout=timeout + 5, check=False).returncode == 0

    def degrade(self) -> None:
        """The standby is gone: let the primary commit alone (else every COMMIT waits
        for it forever), and remember it: promoting that standby later could lose
        what the primary acknowledged meanwhile, so `failover` then refuses."""
        state = self.state()
        if state["sync"] == "on":
            self._synchronous(self.node(state["primary"]), "")
            self._save({**state, "sync": "off"})
            log.warning("ha standby down: primary commits alone", extra={"dir": str(self.root)})

    def failover(self, name: str, *, force: bool = False) -> str:
        """Fence the primary, promote the standby (asynchronous until `rejoin`), point
        PgBouncer at it. Idempotent: a retry after a crash anywhere finishes the job.
        Refused while the standby may be behind (`degrade`d) unless `force`. Returns
        the new primary's node name."""
        state = self.state()
        old, new = state["primary"], _other(state["primary"])
        if state["fenced"] == new:
            raise ServerUnavailable("no standby to promote: it is fenced",
                                    "rejoin it first (it is rebuilt from the primary)")
        if state["sync"] == "off" and state["fenced"] != old and not force:
            raise ServerUnavailable("the standby may be behind: the primary has been "
                                    "committing alone since the standby failed",
                                    "bring the primary back, or failover with force=True "
                                    "to accept losing those commits")
        self._fence(old)
        fenced_at = state.get("fenced_at") if state["fenced"] == old else None
        fenced_at = fenced_at or f"{time.time():.3f}"
        self._save({"primary": old, "fenced": old, "sync": "off", "fenced_at": fenced_at})
        standby = self.node(new)
        standby.start()                     # if it was down too (it may be in recovery)
        self._synchronous(standby, "")
        with closing(standby.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            in_recovery = cur.fetchone()[0]
        if in_recovery:
            run([standby.bin / "pg_ctl", "promote", "-D", standby.data, "-w", "-t", "30",
                 "-s"], timeout=40, user=self.user, cwd=standby.root)
        self._save({"primary": new, "fenced": old, "sync": "off", "fenced_at": fenced_at})
        # a reload would leave the clients whose query waits on the old primary's
        # backends waiting for as long as that host hangs: a restart cuts them (their
        # transaction was never acknowledged) and they reconnect to the new primary
        bouncer = self.bouncer(new)
        bouncer.point(name)
        bouncer.stop()
        bouncer.start()
        log.warning("ha failover", extra={"dir": str(self.root), "primary": new,
                                          "fenced": old})
        return new

    def _fence(self, which: str) -> None:
        node = self.node(which)
        if node.is_running():
            # a node being fenced is one that stopped answering: 2 s for a clean
            # immediate stop, then SIGKILL (a hung postmaster never reacts)
            run([node.bin / "pg_ctl", "stop", "-D", node.data, "-m", "immediate", "-w",
                 "-t", "2", "-s"], timeout=10, user=self.user, cwd=node.root, check=False)
            if node.is_running() and (pid := node.pid()) is not None:
                os.kill(pid, 9)
        fenced = node.data.with_name("data.fenced")
        if node.data.exists():
            if fenced.exists():
                shutil.rmtree(fenced)
            node.data.rename(fenced)

    def rejoin(self) -> None:
        """Rebuild the fenced node as the standby of the primary (pg_basebackup), then
        make replication synchronous again."""
        state = self.state()
        which = state.get("fenced") or self.standby()
        primary = self.node(state["primary"])
        node = self.node(which)
        shutil.rmtree(node.data.with_name("data.fenced"), ignore_errors=True)
        self._standby_from(primary, which)
        self._synchronous(primary, SYNC_NAMES)
        self._save({"primary": state["primary"], "fenced": "", "sync": "on"})
        log.info("ha standby rebuilt", extra={"dir": str(self.root), "standby": which})

    def watch(self, name: str, *, failures: int = 3, interval: float = 0.5,
              stop: threading.Event | None = None, max_seconds: float | None = None,
              once: bool = False) -> bool:
        """Check the primary every `interval` s; after `failures` failed checks in a
        row, fail over and return True. False when `stop` is set or time is up, or
        (`once`: the periodic job, whose next run looks again) as soon as both nodes
        answered. A standby failing as many checks while the primary is fine is
        `degrade`d (the primary then commits alone)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        failed = standby_failed = 0
        while not (stop is not None and stop.is_set()):
            if deadline is not None and time.monotonic() > deadline:
                return False
            failed = 0 if self.check_primary() else failed + 1
            if failed >= failures:
                self.failover(name)
                return True
            if failed == 0 and self.state()["sync"] == "on":
                standby_failed = 0 if self.check_standby() else standby_failed + 1
                if standby_failed >= failures:
                    self.degrade()
                    standby_failed = 0
            if once and failed == 0 and standby_failed == 0:
                return False
            time.sleep(interval)
        return False

    # -- the rest of the life cycle ------------------------------------------------------

    def wait_login(self, name: str, password: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(host=self.bouncer_address, port=self.bouncer_port,
                                 user=name, password=password, dbname=name,
                                 connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"{name} cannot log in through PgBouncer: {exc}",
                                            f"see {self.root}/bouncer/pgbouncer.log") from exc
                time.sleep(0.01)

    def rotate(self, name: str, password: str) -> None:
        self.ensure_running()
        primary = self.node(self.primary())
        with closing(primary.connect()) as conn, conn.cursor() as cur:
            verifier = str(psycopg2.extensions.encrypt_password(password, name, conn,
                                                                "scram-sha-256"))
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(verifier)))
        self.bouncer().configure(name, name, verifier)

    def services(self, addon_id: str) -> list[ServiceSpec]:
        """The nodes that are not fenced and PgBouncer, for runners to supervise (a
        fenced node is left out: its runner stops it, and never starts it again until
        `rejoin` made it the standby)."""
        fenced = self.state().get("fenced")
        out = [self.node(w).service(f"{addon_id}-node-{w}", addon_id)
               for w in NODES if w != fenced and self.node(w).initialized()]
        if self.bouncer().ini.exists():
            out.append(self.bouncer().service(f"{addon_id}-bouncer", addon_id))
        return out

    def ensure_running(self) -> None:
        """Start the nodes that are not fenced and PgBouncer (after a reboot)."""
        fenced = self.state().get("fenced")
        for which in (self.primary(), self.standby()):
            node = self.node(which)
            if which != fenced and node.initialized():
                node.start()
        bouncer = self.bouncer()
        if bouncer.ini.exists():
            bouncer.start()

    def stop(self) -> None:
        self.bouncer().stop()
        for which in (self.standby(), self.primary()):
            try:
                self.node(which).stop()
            except CommandFailed:
                log.warning("ha node did not stop", extra={"dir": str(self.root)})

    def usage_bytes(self, name: str) -> int:
        with closing(self.node(self.primary()).connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(%s)", (name,))
            return int(cur.fetchone()[0])

    def destroy(self, name: str, final_dump: Path | None = None) -> None:
        primary = self.node(self.primary())
        if final_dump is not None and primary.initialized():
            primary.start()
            primary.dump(name, final_dump)
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        log.info("ha postgres destroyed", extra={"dir": str(self.root)})


def _other(which: str) -> str:
    return NODES[1 - NODES.index(which)]
