"""Shared PostgreSQL, by attempt: one real cluster (initdb into a temp dir, started
once for the module), two tenants, and every wall tried with the other tenant's
credentials; each attempt must meet the server's own refusal."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

from dbprovision.names import addon_name, parked_role
from dbprovision.pgcluster import HbaRule, PgCluster
from dbprovision.pgshared import Limits, PgShared
from dbprovision.ports import free_port

pytestmark = pytest.mark.timeout(120)


@dataclass
class Tenant:
    name: str
    password: str


@pytest.fixture(scope="module")
def cluster(berth_root: Path) -> Iterator[PgCluster]:
    root = berth_root / f"pg-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o711)
    c = PgCluster(root / "shared", "127.0.0.1", free_port("127.0.0.1"))
    c.init()
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shared(cluster: PgCluster) -> PgShared:
    return PgShared(cluster)


def _tenant(shared: PgShared, label: str) -> Tenant:
    t = Tenant(addon_name(f"{label}-{uuid.uuid4().hex[:6]}"), uuid.uuid4().hex)
    shared.create(t.name, t.password)
    shared.wait_login(t.name, t.password)
    return t


@pytest.fixture(scope="module")
def a(shared: PgShared) -> Tenant:
    return _tenant(shared, "a")


@pytest.fixture(scope="module")
def b(shared: PgShared) -> Tenant:
    t = _tenant(shared, "b")
    with closing(_connect(shared.cluster, t)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE secrets (id serial PRIMARY KEY, body text)")
        cur.execute("INSERT INTO secrets (body) VALUES ('only b may read this')")
    return t


def _connect(cluster: PgCluster, who: Tenant, dbname: str | None = None,
             password: str | None = None) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(host=cluster.address, port=cluster.port, user=who.name,
                            password=password or who.password, dbname=dbname or who.name,
                            connect_timeout=5)
    conn.autocommit = True
    return conn


def _refused(conn: psycopg2.extensions.connection, query: str | sql.Composable,
             sqlstate: str) -> str:
    """Run `query`, which must fail with `sqlstate`; returns the server's message."""
    with conn.cursor() as cur, pytest.raises(psycopg2.Error) as caught:
        cur.execute(query)
    assert caught.value.pgcode == sqlstate, caught.value.pgerror
    return str(caught.value.pgerror)


class OpenedDoor:
    """Breaks the outer walls on purpose (an extra pg_hba line, a CONNECT grant) to
    show that the inner ones hold by themselves."""

    def __init__(self, shared: PgShared, who: Tenant, into: Tenant) -> None:
        self.shared, self.who, self.into = shared, who, into

    def hba(self) -> None:
        names = [self.who.name, self.into.name]
        self.shared.cluster.write_hba([*(HbaRule(n, n) for n in names),
                                       HbaRule(self.into.name, self.who.name)])

    def connect_grant(self) -> None:
        with closing(self.shared.cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(self.into.name), sql.Identifier(self.who.name)))

    def close(self) -> None:
        with closing(self.shared.cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(
                sql.Identifier(self.into.name), sql.Identifier(self.who.name)))
        self.shared.sync_hba()


@pytest.fixture
def door(shared: PgShared, a: Tenant, b: Tenant) -> Iterator[OpenedDoor]:
    d = OpenedDoor(shared, a, b)
    yield d
    d.close()


def _connect_eventually(cluster: PgCluster, who: Tenant,
                        dbname: str) -> psycopg2.Error | None:
    """The error of connecting (None if it worked) once pg_hba.conf's reload has been
    applied."""
    deadline = time.monotonic() + 5
    while True:
        try:
            _connect(cluster, who, dbname).close()
            return None
        except psycopg2.Error as exc:
            if "no pg_hba.conf entry" not in str(exc) or time.monotonic() > deadline:
                return exc
        time.sleep(0.02)


# -- wall 1: pg_hba.conf -------------------------------------------------------

def test_a_cannot_connect_to_bs_database(shared: PgShared, a: Tenant, b: Tenant):
    with pytest.raises(psycopg2.OperationalError) as caught:
        _connect(shared.cluster, a, b.name)
    assert f'no pg_hba.conf entry for host "127.0.0.1", user "{a.name}", ' \
           f'database "{b.name}"' in str(caught.value)


def test_a_cannot_log_in_as_b_with_its_own_password(shared: PgShared, a: Tenant, b: Tenant):
    with pytest.raises(psycopg2.OperationalError) as caught:
        _connect(shared.cluster, b, password=a.password)
    assert f'password authentication failed for user "{b.name}"' in str(caught.value)


def test_no_one_logs_in_as_the_superuser_over_tcp(shared: PgShared, a: Tenant):
    with pytest.raises(psycopg2.OperationalError) as caught:
        psycopg2.connect(host="127.0.0.1", port=shared.cluster.port, user="postgres",
                         password=a.password, dbname="postgres", connect_timeout=5)
    assert 'no pg_hba.conf entry for host "127.0.0.1", user "postgres"' in str(caught.value)


# -- wall 2: CONNECT privilege ---------------------------------------------------

def test_with_a_pg_hba_line_a_still_lacks_connect(shared: PgShared, a: Tenant, b: Tenant,
                                                  door: OpenedDoor):
    door.hba()
    error = _connect_eventually(shared.cluster, a, b.name)
    assert getattr(error, "pgcode", None) in (None, "42501")
    assert f'permission denied for database "{b.name}"' in str(error)
    assert "User does not have CONNECT privilege." in str(error)


# -- wall 3: schema and table privileges ----------------------------------------------

def test_inside_bs_database_a_can_neither_read_nor_create(shared: PgShared, a: Tenant,
                                                           b: Tenant, door: OpenedDoor):
    door.hba()
    door.connect_grant()
    assert _connect_eventually(shared.cluster, a, b.name) is None
    with closing(_connect(shared.cluster, a, b.name)) as conn:
        assert "permission denied for schema public" in _refused(
            conn, "SELECT body FROM public.secrets", "42501")
        assert "permission denied for schema public" in _refused(
            conn, "CREATE TABLE public.mine (x int)", "42501")
        assert "permission denied for database" in _refused(
            conn, "CREATE SCHEMA mine", "42501")


def test_cross_database_reference_is_refused(shared: PgShared, a: Tenant, b: Tenant):
    with closing(_connect(shared.cluster, a)) as conn:
        _refused(conn, sql.SQL("SELECT * FROM {}").format(
            sql.Identifier(b.name, "public", "secrets")), "0A000")


# -- what a tenant cannot do in its own database -------------------------------------

@pytest.mark.parametrize("query, sqlstate, text", [
    ("CREATE DATABASE other", "42501", "permission denied to create database"),
    ("CREATE ROLE other", "42501", "permission denied to create role"),
    ("CREATE SCHEMA other", "42501", "permission denied for database"),
    ("COPY (SELECT 1) TO PROGRAM 'id'", "42501", "pg_execute_server_program role to COPY"),
    ("SELECT pg_read_file('/etc/passwd')", "42501", "permission denied for function"),
    ("SELECT pg_ls_dir('.')", "42501", "permission denied for function"),
    ("ALTER SYSTEM SET work_mem = '1GB'", "42501", 'permission denied to set parameter'),
])
def test_tenant_refusals(shared: PgShared, a: Tenant, query: str, sqlstate: str, text: str):
    with closing(_connect(shared.cluster, a)) as conn:
        assert text in _refused(conn, query, sqlstate)


def test_a_cannot_become_b_nor_raise_its_limit(shared: PgShared, a: Tenant, b: Tenant):
    with closing(_connect(shared.cluster, a)) as conn:
        _refused(conn, sql.SQL("SET ROLE {}").format(sql.Identifier(b.name)), "42501")
        _refused(conn, sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1000").format(
            sql.Identifier(a.name)), "42501")
        _refused(conn, sql.SQL("SELECT pg_database_size({})").format(sql.Literal(b.name)),
                 "42501")


def test_what_a_tenant_can_see(shared: PgShared, a: Tenant, b: Tenant):
    """Written down in pgshared's docstring: other database and role names, never
    passwords, never other roles' queries."""
    with closing(_connect(shared.cluster, a)) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        assert b.name in {r[0] for r in cur.fetchall()}
        cur.execute("SELECT rolpassword FROM pg_roles WHERE rolname = %s", (b.name,))
        assert cur.fetchone()[0] == "********"
        _refused(conn, "SELECT rolpassword FROM pg_authid", "42501")


def test_role_defaults_and_attributes(shared: PgShared, a: Tenant):
    with closing(_connect(shared.cluster, a)) as conn, conn.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone()[0] == "30s"
        cur.execute("SHOW idle_in_transaction_session_timeout")
        assert cur.fetchone()[0] == "1min"
        cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                    "rolbypassrls, rolconnlimit FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False, False, False, False, 20)


def test_connection_limit_binds(cluster: PgCluster):
    small = PgShared(cluster, limits=Limits(connection_limit=2))
    t = _tenant(small, "limited")
    held = [_connect(cluster, t) for _ in range(2)]
    try:
        with pytest.raises(psycopg2.OperationalError) as caught:
            _connect(cluster, t)
        assert f'too many connections for role "{t.name}"' in str(caught.value)
    finally:
        for conn in held:
            conn.close()
        small.drop(t.name)


# -- over quota: the revocation binds ----------------------------------------------------

@pytest.fixture
def blocked(shared: PgShared) -> Iterator[tuple[Tenant, psycopg2.extensions.connection]]:
    t = _tenant(shared, "quota")
    conn = _connect(shared.cluster, t)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id serial PRIMARY KEY, body text)")
        cur.execute("INSERT INTO items (body) SELECT 'row ' || g FROM generate_series(1, 50) g")
        cur.execute("CREATE VIEW v_items AS SELECT * FROM items")
        cur.execute("CREATE FUNCTION sneak() RETURNS void SECURITY DEFINER LANGUAGE sql AS "
                    "$$ INSERT INTO items (body) VALUES ('sneaked') $$")
        cur.execute("CREATE FUNCTION regrant() RETURNS void SECURITY DEFINER LANGUAGE plpgsql "
                    "AS $$ BEGIN EXECUTE format('GRANT INSERT ON items TO %I', session_user); "
                    "END $$")
    shared.block(t.name)
    yield t, conn
    shared.drop(t.name)


def test_blocked_tenant_cannot_write(blocked):
    _, conn = blocked
    assert "permission denied for table items" in _refused(
        conn, "INSERT INTO items (body) VALUES ('x')", "42501")
    _refused(conn, "UPDATE items SET body = 'x'", "42501")
    _refused(conn, "INSERT INTO v_items (body) VALUES ('x')", "42501")
    _refused(conn, "COPY items (body) FROM STDIN", "42501")
    assert "permission denied for schema public" in _refused(
        conn, "CREATE TABLE more (x int)", "42501")
    assert "permission denied to create temporary tables" in _refused(
        conn, "CREATE TEMP TABLE more (x int)", "42501")
    _refused(conn, "SELECT lo_from_bytea(0, 'bytes')", "42501")
    _refused(conn, "SELECT sneak()", "42501")


def test_blocked_tenant_cannot_give_itself_writes_back(blocked):
    t, conn = blocked
    for attempt in ["GRANT INSERT ON items TO CURRENT_USER",
                    "ALTER TABLE items OWNER TO CURRENT_USER",
                    sql.SQL("SET ROLE {}").format(sql.Identifier(parked_role(t.name))),
                    "SELECT regrant()",
                    "GRANT CREATE ON SCHEMA public TO CURRENT_USER"]:
        with conn.cursor() as cur:
            try:
                cur.execute(attempt)
            except psycopg2.Error as exc:
                assert exc.pgcode == "42501", (attempt, exc.pgerror)
    _refused(conn, "INSERT INTO items (body) VALUES ('x')", "42501")


def test_blocked_tenant_reads_and_deletes(blocked):
    _, conn = blocked
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM v_items")
        assert cur.fetchone()[0] == 50
        cur.execute("DELETE FROM items WHERE id <= 10 RETURNING id")
        assert len(cur.fetchall()) == 10
        cur.execute("TRUNCATE items")
        cur.execute("SELECT count(*) FROM items")
        assert cur.fetchone()[0] == 0


def test_restore_gives_writes_and_ownership_back(shared: PgShared, blocked):
    t, conn = blocked
    shared.restore(t.name)
    assert not shared.is_blocked(t.name)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO items (body) VALUES ('again') RETURNING id")
        cur.execute("ALTER TABLE items ADD COLUMN extra int")
        cur.execute("CREATE TABLE more (x int)")
        cur.execute("CREATE TEMP TABLE scratch (x int)")
        cur.execute("SELECT lo_unlink(lo_from_bytea(0, 'bytes'))")
        cur.execute("SELECT sneak()")
        cur.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert {r[0] for r in cur.fetchall()} == {t.name}
    with closing(shared.cluster.connect()) as admin, admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (parked_role(t.name),))
        assert cur.fetchone() is None


def test_block_and_restore_are_idempotent(shared: PgShared, blocked):
    t, conn = blocked
    shared.block(t.name)
    assert shared.is_blocked(t.name)
    shared.restore(t.name)
    shared.restore(t.name)
    assert not shared.is_blocked(t.name)


# -- rotate, crash, drop -----------------------------------------------------------------

def test_rotate_refuses_the_old_password(shared: PgShared):
    t = _tenant(shared, "rotate")
    old = _connect(shared.cluster, t)
    shared.rotate(t.name, "new-" + t.password)
    with pytest.raises(psycopg2.OperationalError) as caught:
        _connect(shared.cluster, t)
    assert f'password authentication failed for user "{t.name}"' in str(caught.value)
    _connect(shared.cluster, t, password="new-" + t.password).close()
    with old.cursor() as cur:      # an open session is not cut by a rotation
        cur.execute("SELECT 1")
    old.close()
    shared.drop(t.name)


def test_create_finishes_a_half_made_tenant(shared: PgShared):
    name, password = addon_name(f"half-{uuid.uuid4().hex[:6]}"), "pw-" + uuid.uuid4().hex
    with closing(shared.cluster.connect()) as conn:
        shared.create_role(conn, name, password)      # then the provisioner died
    assert not shared.exists(name)
    shared.create(name, password)
    shared.wait_login(name, password)
    with _connect(shared.cluster, Tenant(name, password)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
    shared.drop(name)


def test_drop_keeps_a_final_dump_and_is_idempotent(shared: PgShared, tmp_path: Path):
    t = _tenant(shared, "drop")
    with closing(_connect(shared.cluster, t)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (x int)")
        cur.execute("INSERT INTO kept VALUES (42)")
    dump = tmp_path / "final.dump"
    shared.drop(t.name, final_dump=dump)
    assert dump.read_bytes()[:5] == b"PGDMP"
    assert not shared.exists(t.name)
    assert t.name not in (shared.cluster.data / "pg_hba.conf").read_text()
    shared.drop(t.name, final_dump=dump)
    with pytest.raises(psycopg2.OperationalError):
        _connect(shared.cluster, t)
