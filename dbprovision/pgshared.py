"""Tenants of the shared PostgreSQL cluster: a login role and a database per addon,
walled off by the server's own means, and a storage quota that binds.

Per addon `name` (see names.py) the cluster holds:
- role `name`: LOGIN, no other attribute (not superuser, no CREATEDB, CREATEROLE,
  REPLICATION or BYPASSRLS), a CONNECTION LIMIT, statement_timeout and
  idle_in_transaction_session_timeout as its defaults, a scram-sha-256 verifier
  computed client-side (the password itself never reaches the server or its log);
- database `name`, owned by the superuser, with `REVOKE ALL ... FROM PUBLIC` and
  CONNECT + TEMPORARY granted to the role; in it, schema public with everything
  revoked from PUBLIC and USAGE + CREATE granted to the role;
- while over quota only, role `name_parked`: NOLOGIN, owns the tenant's tables;
- a pg_hba.conf line `host name name <clients> scram-sha-256`.
The database is a spare renamed when one waits (`add_spares`: made ahead, with no role
and no pg_hba.conf line), since CREATE DATABASE copies and fsyncs template1 and is
most of a provisioning's time.

Why this ownership, and why the revocation binds. The tenant must own the tables it
makes, or its migrations (ALTER TABLE, CREATE INDEX) fail. But an owner can always
grant itself back any privilege, so revoking INSERT from the owner binds nothing; in
PostgreSQL 15 neither does membership in a NOLOGIN owner role (any member may SET
ROLE to it; `WITH SET FALSE` arrives in 16). So over quota, in one transaction:
- CREATE on schema public and TEMPORARY on the database are revoked (no new tables,
  no temporary ones). The tenant cannot grant them back: it owns neither the database
  nor the schema (the schema's owner is pg_database_owner = the superuser);
- each of its relations in public is handed to `name_parked` (ALTER ... OWNER), so
  the tenant owns nothing it could re-grant on; it is granted SELECT, DELETE and
  TRUNCATE there (SELECT on sequences): reads and deletes keep working;
- INSERT and UPDATE are revoked from `name_parked` itself, so a view or a rule, which
  run as the owner, cannot write for the tenant either; nothing ever runs as
  `name_parked` otherwise (it cannot log in; the tenant is not a member of it);
- its functions stay its own: a SECURITY DEFINER one runs as the tenant, who has no
  INSERT; the large-object write functions (lo_creat, lo_create, lo_from_bytea,
  lowrite, lo_put, lo_import) lose EXECUTE for PUBLIC in that database, since large
  objects need no table privilege.
Back under quota, the relations return to the tenant with all their privileges, and
CREATE, TEMPORARY and the large-object functions come back. Blocking takes an ACCESS
EXCLUSIVE lock per table (ALTER OWNER), bounded by lock_timeout: a long transaction of
the tenant makes the check fail (QuotaBusy) and the next one retry.
What does not work while blocked: UPDATE, INSERT, nextval, DDL, VACUUM by the tenant
(the platform vacuums before it measures), unlinking its large objects, and a DELETE
whose foreign keys cascade as SET NULL/DEFAULT (an UPDATE by the owner).

What a tenant of the shared cluster can still see (PostgreSQL's catalogs are shared
and readable by every role): the names of every database (pg_database) and role
(pg_roles; never passwords), the other databases' activity counters
(pg_stat_database) and who is connected to which database (pg_stat_activity, without
other roles' query text), the server version and settings (pg_settings). What it
cannot do: connect to another database (no pg_hba.conf line: 28000; and no CONNECT
privilege), read or write another tenant's tables (they are in databases it cannot
enter), create objects outside its own schema, read another database's size, hold
more than its CONNECTION LIMIT sessions, read server files, run programs (COPY
PROGRAM), replicate, or write over quota. The statement and idle timeouts are
defaults: a tenant may change them for its own sessions (SET), as on any hosted
PostgreSQL; it may also change its own password, which a rotation overrides.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from .errors import AddonNotFound, QuotaBusy, ServerUnavailable
from .names import is_addon_name, parked_role
from .pgcluster import SUPERUSER, HbaRule, PgCluster

log = logging.getLogger(__name__)

# the large-object functions that write; with their argument types, fixed text
LO_WRITERS = ("lo_creat(integer)", "lo_create(oid)", "lo_from_bytea(oid, bytea)",
              "lowrite(integer, bytea)", "lo_put(oid, bigint, bytea)", "lo_import(text)",
              "lo_import(text, oid)")
# empty databases made ahead of time (no role, no pg_hba.conf line: nobody enters)
SPARE_PREFIX = "berth_spare_"
# relation kinds a tenant may own in its schema, and how to ALTER each one's owner
RELKINDS = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW",
            "f": "FOREIGN TABLE", "S": "SEQUENCE"}


@dataclass(frozen=True)
class Limits:
    """What every shared tenant gets; the plan may change them later."""

    connection_limit: int = 20
    statement_timeout: str = "30s"
    idle_in_transaction_session_timeout: str = "60s"
    lock_timeout: str = "2s"        # the platform's own, while blocking or restoring


class PgShared:
    def __init__(self, cluster: PgCluster, *, clients: str = "127.0.0.0/8",
                 limits: Limits | None = None) -> None:
        self.cluster = cluster
        self.clients = clients
        self.limits = limits or Limits()

    # -- creation -------------------------------------------------------------

    def create(self, name: str, password: str) -> None:
        """Make (or finish making) tenant `name`; every step is idempotent, so a
        provisioner that died after any of them finishes the job on its next try."""
        with self._admin() as conn:
            self.create_role(conn, name, password)
            self.create_database(conn, name)
        self.secure_database(name)
        self.sync_hba()

    def create_role(self, conn: psycopg2.extensions.connection, name: str,
                    password: str) -> None:
        verifier = psycopg2.extensions.encrypt_password(password, name, conn,
                                                        "scram-sha-256")
        role = sql.Identifier(name)
        with conn.cursor() as cur:
            verb = "ALTER" if self._exists(cur, "pg_roles", "rolname", name) else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB "
                                "NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT "
                                "CONNECTION LIMIT {} PASSWORD {}").format(
                role, sql.Literal(self.limits.connection_limit), sql.Literal(verifier)))
            for setting in ("statement_timeout", "idle_in_transaction_session_timeout"):
                cur.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    role, sql.Identifier(setting),
                    sql.Literal(getattr(self.limits, setting))))

    def create_database(self, conn: psycopg2.extensions.connection, name: str) -> None:
        """A spare renamed (a catalog update), else CREATE DATABASE (a copy of
        template1, 7.5 MB, fsynced: the slow step, seconds when the disk is busy)."""
        with conn.cursor() as cur:
            if self._exists(cur, "pg_database", "datname", name):
                return
            cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) "
                        "ORDER BY oid LIMIT 1", (SPARE_PREFIX,))
            spare = cur.fetchone()
            if spare is not None:
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(spare[0]), sql.Identifier(name)))
            else:
                self._create_database(cur, name)

    def add_spares(self, count: int) -> int:
        """Create empty databases until `count` spares wait for tenants; returns how
        many were made. The caller serializes this with create() (one writer)."""
        made = 0
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_database WHERE starts_with(datname, %s)",
                        (SPARE_PREFIX,))
            for _ in range(count - int(cur.fetchone()[0])):
                self._create_database(cur, SPARE_PREFIX + secrets.token_hex(6))
                made += 1
        return made

    @staticmethod
    def _create_database(cur: psycopg2.extensions.cursor, name: str) -> None:
        db = sql.Identifier(name)
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
            db, sql.Identifier(SUPERUSER)))
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))

    def secure_database(self, name: str) -> None:
        """The database and its schema public are the tenant's to use, no one else's
        (re-applied on every provision: a crash may have come between the steps)."""
        tenant, db = sql.Identifier(name), sql.Identifier(name)
        with self._admin(name) as conn, conn.cursor() as cur:
            blocked = self._is_blocked(cur, name)
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
            cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, tenant))
            cur.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(tenant))
            if not blocked:
                cur.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(
                    db, tenant))
                cur.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(tenant))

    def sync_hba(self) -> None:
        """pg_hba.conf from the catalog: one line per tenant whose role and database
        both exist. Serialized by the caller's server lock."""
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT d.datname FROM pg_database d JOIN pg_roles r "
                        "ON r.rolname = d.datname WHERE r.rolcanlogin ORDER BY 1")
            names = [n for (n,) in cur.fetchall() if is_addon_name(n)]
        self.cluster.write_hba([HbaRule(n, n, self.clients) for n in names])

    def wait_login(self, name: str, password: str, timeout: float = 5) -> None:
        """Return once `name` can log in over TCP (the reload is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(host=self.cluster.address, port=self.cluster.port,
                                 user=name, password=password, dbname=name,
                                 connect_timeout=2).close()
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"the new role {name} cannot log in: {exc}",
                                            f"see {self.cluster.log_file}") from exc
                time.sleep(0.01)

    # -- the other verbs ------------------------------------------------------

    def rotate(self, name: str, password: str) -> None:
        """A new password; the old one is refused from now on (sessions already open
        stay open, so a rolling release keeps serving)."""
        with self._admin() as conn:
            with conn.cursor() as cur:
                if not self._exists(cur, "pg_roles", "rolname", name):
                    raise AddonNotFound(f"no role {name} in the shared cluster")
            self.create_role(conn, name, password)

    def drop(self, name: str, final_dump: Path | None = None) -> None:
        """Dump (when asked and the database exists), wall off, end sessions, drop."""
        with self._admin() as conn, conn.cursor() as cur:
            has_db = self._exists(cur, "pg_database", "datname", name)
        if has_db and final_dump is not None:
            self.cluster.dump(name, final_dump)
        with self._admin() as conn, conn.cursor() as cur:
            if self._exists(cur, "pg_roles", "rolname", name):
                cur.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(name)))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE usename = %s", (name,))
            for role in (name, parked_role(name)):
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        self.sync_hba()

    def exists(self, name: str) -> bool:
        with self._admin() as conn, conn.cursor() as cur:
            return self._exists(cur, "pg_database", "datname", name)

    def usage_bytes(self, name: str) -> int:
        with self._admin() as conn, conn.cursor() as cur:
            if not self._exists(cur, "pg_database", "datname", name):
                raise AddonNotFound(f"no database {name} in the shared cluster")
            cur.execute("SELECT pg_database_size(%s)", (name,))
            return int(cur.fetchone()[0])

    # -- quota ------------------------------------------------------------------

    def is_blocked(self, name: str) -> bool:
        with self._admin() as conn, conn.cursor() as cur:
            return self._is_blocked(cur, name)

    def vacuum(self, name: str) -> None:
        """A plain VACUUM of the tenant's database, so deleted rows at the end of a
        table give their space back before we measure (the tenant, not owning its
        tables while blocked, cannot)."""
        with self._admin(name) as conn, conn.cursor() as cur:
            cur.execute("VACUUM")

    def block(self, name: str) -> None:
        """Revoke writes; see the module's docstring for why this binds. One
        transaction: the parked role's existence is the flag, so a crash leaves the
        tenant either wholly blocked or not at all."""
        tenant, parked = sql.Identifier(name), sql.Identifier(parked_role(name))
        with self._transaction(name, "block") as cur:
            if self._is_blocked(cur, name):
                return
            cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(parked))
            cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(tenant))
            cur.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(
                sql.Identifier(name), tenant))
            for kind, relation in self._relations(cur, name):
                cur.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
                    sql.SQL(RELKINDS[kind]), relation, parked))
            cur.execute(sql.SQL("REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA public "
                                "FROM {}").format(parked))
            cur.execute(sql.SQL("GRANT SELECT, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA "
                                "public TO {}").format(tenant))
            cur.execute(sql.SQL("GRANT SELECT ON ALL SEQUENCES IN SCHEMA public "
                                "TO {}").format(tenant))
            for function in LO_WRITERS:
                cur.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION pg_catalog." + function
                                    + " FROM PUBLIC"))
        log.warning("writes revoked: over quota", extra={"addon": name})

    def restore(self, name: str) -> None:
        """Give the tenant its tables and its rights back, and drop the flag."""
        tenant, parked = sql.Identifier(name), sql.Identifier(parked_role(name))
        with self._transaction(name, "restore") as cur:
            if not self._is_blocked(cur, name):
                return
            for kind, relation in self._relations(cur, parked_role(name)):
                cur.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(
                    sql.SQL(RELKINDS[kind]), relation, tenant))
            cur.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(
                tenant))
            cur.execute(sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}").format(
                tenant))
            cur.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(tenant))
            cur.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(
                sql.Identifier(name), tenant))
            for function in LO_WRITERS:
                cur.execute(sql.SQL("GRANT EXECUTE ON FUNCTION pg_catalog." + function
                                    + " TO PUBLIC"))
            cur.execute(sql.SQL("DROP ROLE {}").format(parked))
        log.info("writes restored: back under quota", extra={"addon": name})

    # -- helpers ------------------------------------------------------------------

    @contextmanager
    def _admin(self, dbname: str = "postgres") -> Iterator[psycopg2.extensions.connection]:
        """The superuser's connection (autocommit), closed after the block."""
        try:
            conn = self.cluster.connect(dbname)
        except psycopg2.OperationalError as exc:
            raise ServerUnavailable(f"the shared PostgreSQL cluster does not answer: {exc}",
                                    "start it with Provisioner.ensure_shared_servers()"
                                    ) from exc
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self, name: str, what: str) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction in the tenant's database, bounded by lock_timeout."""
        with self._admin(name) as conn:
            conn.autocommit = False
            try:
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL lock_timeout = %s", (self.limits.lock_timeout,))
                    yield cur
                conn.commit()
            except psycopg2.errors.LockNotAvailable as exc:
                conn.rollback()
                raise QuotaBusy(f"could not {what} {name}: a transaction of the tenant "
                                "holds a lock on one of its tables") from exc
            except BaseException:
                conn.rollback()
                raise

    @staticmethod
    def _exists(cur: psycopg2.extensions.cursor, catalog: str, column: str,
                value: str) -> bool:
        cur.execute(sql.SQL("SELECT 1 FROM {} WHERE {} = %s").format(
            sql.Identifier("pg_catalog", catalog), sql.Identifier(column)), (value,))
        return cur.fetchone() is not None

    @classmethod
    def _is_blocked(cls, cur: psycopg2.extensions.cursor, name: str) -> bool:
        """The parked role exists only while the tenant is blocked."""
        return cls._exists(cur, "pg_roles", "rolname", parked_role(name))

    @staticmethod
    def _relations(cur: psycopg2.extensions.cursor,
                   owner: str) -> list[tuple[str, sql.Composable]]:
        """`owner`'s relations in schema public that ALTER ... OWNER moves by
        themselves: sequences owned by a column move with their table."""
        cur.execute(
            "SELECT c.relkind, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relowner = %s::regrole "
            "AND c.relkind = ANY(%s) AND NOT (c.relkind = 'S' AND EXISTS ("
            "  SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
            "  AND d.objid = c.oid AND d.deptype IN ('a', 'i'))) "
            "ORDER BY c.oid",
            (owner, list(RELKINDS)))
        return [(kind, sql.Identifier("public", rel)) for kind, rel in cur.fetchall()]
