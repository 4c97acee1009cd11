"""Dedicated PostgreSQL through the facade, by attempt: its own cluster and PgBouncer
(transaction pooling), an owner role that is not a superuser, walls between two
dedicated tenants, rotation through PgBouncer, a crash half-way, destroy, restart."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest

from dbprovision.names import addon_name
from dbprovision.pgbouncer import PgBouncer
from dbprovision.service import Credentials, Provisioner

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def data_dir(berth_root: Path) -> Path:
    return berth_root / f"pgded-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def prov(data_dir: Path) -> Iterator[Provisioner]:
    p = Provisioner(data_dir)
    yield p
    Provisioner(data_dir).stop_all()


@pytest.fixture(scope="module")
def a(prov: Provisioner) -> Credentials:
    return prov.provision(f"a-{uuid.uuid4().hex[:6]}", "postgres", "dedicated")


@pytest.fixture(scope="module")
def b(prov: Provisioner) -> Credentials:
    creds = prov.provision(f"b-{uuid.uuid4().hex[:6]}", "postgres", "dedicated")
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE secrets (body text)")
        cur.execute("INSERT INTO secrets VALUES ('only b')")
    return creds


def _connect(url: str, **changes: str) -> psycopg2.extensions.connection:
    parts = urlsplit(url)
    args = {"host": parts.hostname, "port": parts.port, "user": parts.username,
            "password": parts.password, "dbname": parts.path.lstrip("/"), **changes}
    conn = psycopg2.connect(connect_timeout=5, **args)
    conn.autocommit = True
    return conn


def test_url_points_at_pgbouncer_in_transaction_pooling(a: Credentials):
    direct = a.extra["DATABASE_DIRECT_URL"]
    assert a.env["DATABASE_DIRECT_URL"] == direct and a.env["DATABASE_URL"] == a.url
    assert urlsplit(direct).port != a.port
    held = [_connect(a.url) for _ in range(5)]
    pids = set()
    for conn in held:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pids.add(cur.fetchone()[0])
    for conn in held:
        conn.close()
    assert len(pids) < 5            # five clients, fewer server connections: pooled


def test_owner_role_is_not_a_superuser(a: Credentials):
    with closing(_connect(a.extra["DATABASE_DIRECT_URL"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole, rolreplication, rolbypassrls, "
                    "pg_get_userbyid(d.datdba) = current_user FROM pg_roles, pg_database d "
                    "WHERE rolname = current_user AND d.datname = current_database()")
        assert cur.fetchone() == (False, False, False, False, True)
        cur.execute("CREATE SCHEMA mine")            # its own database: it may
        for query in ("ALTER SYSTEM SET work_mem = '1GB'", "CREATE ROLE other",
                      "COPY (SELECT 1) TO PROGRAM 'id'", "SELECT pg_read_file('PG_VERSION')"):
            with pytest.raises(psycopg2.Error) as caught:
                cur.execute(query)
            assert caught.value.pgcode == "42501", query


def test_a_cannot_reach_b(a: Credentials, b: Credentials):
    b_db = urlsplit(b.url).path.lstrip("/")
    b_direct = urlsplit(b.extra["DATABASE_DIRECT_URL"])
    a_parts = urlsplit(a.url)
    with pytest.raises(psycopg2.OperationalError) as caught:      # B's own server
        _connect(b.extra["DATABASE_DIRECT_URL"], user=a_parts.username,
                 password=a_parts.password)
    assert "no pg_hba.conf entry" in str(caught.value)
    with pytest.raises(psycopg2.OperationalError):                # B's PgBouncer
        _connect(b.url, user=a_parts.username, password=a_parts.password)
    with pytest.raises(psycopg2.OperationalError) as caught:      # A's PgBouncer knows A
        _connect(a.url, dbname=b_db)
    assert "no such database" in str(caught.value)
    assert b_direct.port != urlsplit(a.extra["DATABASE_DIRECT_URL"]).port


def test_no_superuser_or_other_database_over_tcp(a: Credentials):
    with pytest.raises(psycopg2.OperationalError) as caught:
        _connect(a.extra["DATABASE_DIRECT_URL"], dbname="postgres")
    assert "no pg_hba.conf entry" in str(caught.value)
    with pytest.raises(psycopg2.OperationalError) as caught:
        _connect(a.extra["DATABASE_DIRECT_URL"], user="postgres")
    assert "no pg_hba.conf entry" in str(caught.value)


def test_rotate_through_pgbouncer(prov: Provisioner):
    addon = f"rot-{uuid.uuid4().hex[:6]}"
    old = prov.provision(addon, "postgres", "dedicated")
    new = prov.rotate(addon, "postgres", "dedicated")
    for url in (old.url, old.extra["DATABASE_DIRECT_URL"]):
        with pytest.raises(psycopg2.OperationalError) as caught:
            _connect(url)
        assert "authentication failed" in str(caught.value)
    _connect(new.url).close()
    _connect(new.extra["DATABASE_DIRECT_URL"]).close()
    prov.destroy(addon, "postgres", "dedicated")


def test_crash_before_pgbouncer_is_finished_on_retry(prov: Provisioner, monkeypatch,
                                                     tmp_path: Path):
    addon = f"crash-{uuid.uuid4().hex[:6]}"

    def die(self, timeout: float = 10) -> None:
        raise RuntimeError("killed before PgBouncer started")

    monkeypatch.setattr(PgBouncer, "start", die)
    with pytest.raises(RuntimeError):
        prov.provision(addon, "postgres", "dedicated")
    monkeypatch.undo()
    password = prov.records.get(addon_name(addon)).password
    creds = prov.provision(addon, "postgres", "dedicated")
    assert creds.env["DB_PASSWORD"] == password
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (x int)")
    record = prov.records.get(addon_name(addon))
    root = prov._dedicated_root("postgres", record.name)
    pids = [prov._dedicated_pg(record).cluster.pid(), prov._dedicated_pg(record).bouncer.pid()]
    prov.destroy(addon, "postgres", "dedicated", final_dump=tmp_path / "final.dump")
    prov.destroy(addon, "postgres", "dedicated")
    assert (tmp_path / "final.dump").read_bytes()[:5] == b"PGDMP"
    assert not root.exists()
    for pid in pids:
        assert pid is not None
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_usage_and_quota(prov: Provisioner, a: Credentials):
    addon_id = prov.records.get(urlsplit(a.url).username).addon_id
    assert 5 < prov.usage_mb(addon_id) < 50
    assert prov.enforce_quota(addon_id, 1) == "warn"      # never blocked


def test_restart(prov: Provisioner, data_dir: Path, a: Credentials):
    prov.stop_all()
    with pytest.raises(psycopg2.OperationalError):
        _connect(a.url)
    again = Provisioner(data_dir)
    again.ensure_dedicated_servers()
    _connect(a.url).close()
    _connect(a.extra["DATABASE_DIRECT_URL"]).close()


@pytest.mark.parametrize("engine", ["redis", "postgres"])
def test_a_port_taken_meanwhile_gets_other_ports(prov: Provisioner, engine: str):
    """Two workers may choose the same free port at once: the loser of the race takes
    other ports instead of failing for ever."""
    import socket

    from dbprovision.records import AddonRecord

    addon = f"race-{engine}-{uuid.uuid4().hex[:6]}"
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    free = other.getsockname()[1]
    other.close()
    name = addon_name(addon)
    ports = {"port": taken, "direct_port": free} if engine == "postgres" else {"port": taken}
    prov.records.put(AddonRecord(addon, engine, "dedicated", name, "pw-" + uuid.uuid4().hex,
                                 "127.0.0.1", **ports))
    try:
        creds = prov.provision(addon, engine, "dedicated")   # type: ignore[arg-type]
        assert creds.port != taken
        if engine == "postgres":
            _connect(creds.url).close()
    finally:
        squatter.close()
        prov.destroy(addon, engine, "dedicated")  # type: ignore[arg-type]
