"""The facade the controller calls, on real servers: provisioning (and finishing a
half-made addon after a crash), quotas from warning to restored, rotation, destroy,
and a restart that keeps every credential valid."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dbprovision.errors import InvalidAddon
from dbprovision.names import addon_name, parked_role
from dbprovision.pgshared import PgShared
from dbprovision.service import Credentials, Provisioner

pytestmark = pytest.mark.timeout(120)
NO_RETRY = Retry(NoBackoff(), 0)


@pytest.fixture(scope="module")
def data_dir(berth_root: Path) -> Path:
    return berth_root / f"addons-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def prov(data_dir: Path) -> Iterator[Provisioner]:
    p = Provisioner(data_dir)
    p.ensure_shared_servers()
    yield p
    Provisioner(data_dir).stop_all()


def _id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:6]}"


def _pg(creds: Credentials, dbname: str | None = None) -> psycopg2.extensions.connection:
    env = creds.env
    conn = psycopg2.connect(host=env["DB_HOST"], port=int(env["DB_PORT"]),
                            user=env["DB_USER"], password=env["DB_PASSWORD"],
                            dbname=dbname or env["DB_NAME"], connect_timeout=5)
    conn.autocommit = True
    return conn


def _redis(creds: Credentials) -> redis.Redis:
    return redis.Redis.from_url(creds.url, socket_timeout=5, retry=NO_RETRY)


# -- postgres shared ---------------------------------------------------------------------

def test_shared_postgres_credentials(prov: Provisioner):
    creds = prov.provision(_id("web"), "postgres", "shared")
    assert set(creds.env) == {"DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER",
                              "DB_PASSWORD"}
    assert creds.url == creds.env["DATABASE_URL"]
    assert creds.url.startswith("postgresql://")
    assert (creds.host, creds.port) == ("127.0.0.1", prov.pg.port)
    with closing(psycopg2.connect(creds.url, connect_timeout=5)) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database()")
        assert cur.fetchone() == (creds.env["DB_USER"], creds.env["DB_NAME"])


def test_spare_databases(prov: Provisioner):
    """Provisioning renames a spare; spares have no role and no pg_hba.conf line."""
    from dbprovision.pgshared import SPARE_PREFIX

    def spares() -> list[str]:
        with closing(prov.pg.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) "
                        "ORDER BY oid", (SPARE_PREFIX,))
            return [r[0] for r in cur.fetchall()]

    prov.refill_spares()
    before = spares()
    assert len(before) == 3
    creds = prov.provision(_id("spare"), "postgres", "shared")
    assert spares() == before[1:]
    assert SPARE_PREFIX not in (prov.pg.data / "pg_hba.conf").read_text()
    with pytest.raises(psycopg2.OperationalError) as caught:
        _pg(creds, dbname=before[1])
    assert "no pg_hba.conf entry" in str(caught.value)
    assert prov.refill_spares() == 1


def test_provision_is_idempotent(prov: Provisioner):
    addon = _id("again")
    first = prov.provision(addon, "postgres", "shared")
    assert prov.provision(addon, "postgres", "shared") == first
    with pytest.raises(InvalidAddon):
        prov.provision(addon, "redis", "shared")


def test_a_cannot_reach_bs_database_through_the_facade(prov: Provisioner):
    a = prov.provision(_id("a"), "postgres", "shared")
    b = prov.provision(_id("b"), "postgres", "shared")
    with pytest.raises(psycopg2.OperationalError) as caught:
        _pg(a, dbname=b.env["DB_NAME"])
    assert "no pg_hba.conf entry" in str(caught.value)


def test_crash_after_the_role_is_finished_on_retry(prov: Provisioner, monkeypatch):
    addon = _id("crash")

    def die(self, conn, name):
        raise RuntimeError("provisioner killed here")

    monkeypatch.setattr(PgShared, "create_database", die)
    with pytest.raises(RuntimeError):
        prov.provision(addon, "postgres", "shared")
    name = addon_name(addon)
    assert prov.records.get(name).state == "creating"
    with closing(prov.pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        assert cur.fetchone() is not None       # the role exists, the database not
    monkeypatch.undo()
    password = prov.records.get(name).password
    creds = prov.provision(addon, "postgres", "shared")
    assert creds.env["DB_PASSWORD"] == password
    assert prov.records.get(name).state == "ready"
    with closing(_pg(creds)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")


def test_destroy_cleans_up_a_half_made_addon(prov: Provisioner, monkeypatch):
    addon = _id("half")
    monkeypatch.setattr(PgShared, "create_database",
                        lambda self, conn, name: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        prov.provision(addon, "postgres", "shared")
    monkeypatch.undo()
    prov.destroy(addon, "postgres", "shared")
    prov.destroy(addon, "postgres", "shared")
    assert prov.records.get(addon_name(addon)) is None
    with closing(prov.pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (addon_name(addon),))
        assert cur.fetchone() is None


def test_destroy_keeps_a_final_dump(prov: Provisioner, tmp_path: Path):
    addon = _id("gone")
    creds = prov.provision(addon, "postgres", "shared")
    with closing(_pg(creds)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (x int)")
    prov.destroy(addon, "postgres", "shared", final_dump=tmp_path / "final.dump")
    assert (tmp_path / "final.dump").read_bytes()[:5] == b"PGDMP"
    with pytest.raises(psycopg2.OperationalError):
        _pg(creds)


def test_rotate_invalidates_the_old_password(prov: Provisioner):
    addon = _id("rot")
    old = prov.provision(addon, "postgres", "shared")
    new = prov.rotate(addon, "postgres", "shared")
    assert new.env["DB_PASSWORD"] != old.env["DB_PASSWORD"]
    with pytest.raises(psycopg2.OperationalError) as caught:
        _pg(old)
    assert "password authentication failed" in str(caught.value)
    _pg(new).close()
    assert prov.provision(addon, "postgres", "shared") == new


def test_over_quota_warn_block_restore(prov: Provisioner):
    addon = _id("quota")
    creds = prov.provision(addon, "postgres", "shared")
    base = prov.usage_mb(addon)
    quota = int(base / 0.95) + 1            # usage is ~90-95% of it: a warning
    with closing(_pg(creds)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (body text)")
        assert prov.enforce_quota(addon, quota) in ("ok", "warn")
        while prov.usage_mb(addon) < 0.9 * quota:
            cur.execute("INSERT INTO items SELECT md5(g::text) FROM generate_series(1, 2000) g")
        assert prov.enforce_quota(addon, quota) == "warn"
        while prov.usage_mb(addon) < quota:
            cur.execute("INSERT INTO items SELECT md5(g::text) FROM generate_series(1, 5000) g")
        assert prov.enforce_quota(addon, quota) == "blocked"
        with pytest.raises(psycopg2.errors.InsufficientPrivilege) as caught:
            cur.execute("INSERT INTO items VALUES ('one more')")
        assert "permission denied for table items" in str(caught.value)
        assert prov.enforce_quota(addon, quota) == "blocked"       # still over
        cur.execute("DELETE FROM items")                            # deletes work
        assert prov.enforce_quota(addon, quota) == "restored"
        cur.execute("INSERT INTO items VALUES ('back')")
        assert prov.enforce_quota(addon, quota) in ("ok", "warn")
    with closing(prov.pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                    (parked_role(addon_name(addon)),))
        assert cur.fetchone() is None


# -- redis -----------------------------------------------------------------------------------

def test_shared_redis(prov: Provisioner):
    a = prov.provision(_id("cache-a"), "redis", "shared")
    b = prov.provision(_id("cache-b"), "redis", "shared")
    assert a.env["REDIS_URL"] == a.url and a.port == prov.redis.port
    with _redis(a) as ca, _redis(b) as cb:
        cb.set(b.env["REDIS_KEY_PREFIX"] + "k", "b's")
        ca.set(a.env["REDIS_KEY_PREFIX"] + "k", "a's")
        with pytest.raises(redis.exceptions.NoPermissionError):
            ca.get(b.env["REDIS_KEY_PREFIX"] + "k")
        with pytest.raises(redis.exceptions.NoPermissionError):
            ca.keys("*")


def test_shared_redis_quota(prov: Provisioner):
    addon = _id("rq")
    creds = prov.provision(addon, "redis", "shared")
    key = creds.env["REDIS_KEY_PREFIX"] + "big"
    with _redis(creds) as c:
        c.set(key, "x" * 2 * 1024 * 1024)
        assert prov.enforce_quota(addon, 1) == "blocked"
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.set(creds.env["REDIS_KEY_PREFIX"] + "more", "x")
        assert c.get(key) is not None
        c.delete(key)
        assert prov.enforce_quota(addon, 1) == "restored"
        c.set(creds.env["REDIS_KEY_PREFIX"] + "more", "x")
    prov.rotate(addon, "redis", "shared")       # a rotation keeps a block, and no block
    assert prov.enforce_quota(addon, 1) == "ok"


def test_dedicated_redis(prov: Provisioner):
    addon = _id("ded")
    creds = prov.provision(addon, "redis", "dedicated", quota_mb=16)
    assert creds.port not in (prov.redis.port, prov.pg.port)
    assert "REDIS_KEY_PREFIX" not in creds.env
    assert prov.provision(addon, "redis", "dedicated", quota_mb=16) == creds
    with _redis(creds) as c:
        c.set("anything", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.config_get("maxmemory")
    assert 0 < prov.usage_mb(addon) < 16
    new = prov.rotate(addon, "redis", "dedicated")
    with _redis(creds) as c, pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()
    with _redis(new) as c:
        assert c.get("anything") == b"1"


def test_dedicated_redis_destroy(prov: Provisioner, tmp_path: Path):
    addon = _id("dgone")
    creds = prov.provision(addon, "redis", "dedicated")
    prov.destroy(addon, "redis", "dedicated", final_dump=tmp_path / "final.rdb")
    prov.destroy(addon, "redis", "dedicated")
    assert (tmp_path / "final.rdb").read_bytes()[:5] == b"REDIS"
    with _redis(creds) as c, pytest.raises(redis.exceptions.ConnectionError):
        c.ping()


def test_unknown_plans(prov: Provisioner):
    with pytest.raises(InvalidAddon):
        prov.provision(_id("x"), "postgres", "platinum")  # type: ignore[arg-type]
    with pytest.raises(InvalidAddon):
        prov.provision(_id("x"), "mysql", "shared")  # type: ignore[arg-type]
    with pytest.raises(InvalidAddon):
        prov.provision("", "redis", "shared")


# -- restart: last, it stops the module's servers -------------------------------------------

def test_restart_keeps_every_credential(prov: Provisioner, data_dir: Path):
    pg = prov.provision(_id("durable"), "postgres", "shared")
    rd = prov.provision(_id("durable-r"), "redis", "dedicated")
    rs = prov.provision(_id("durable-s"), "redis", "shared")
    with _redis(rs) as c:
        c.set(rs.env["REDIS_KEY_PREFIX"] + "k", "kept")
    pids = (prov.pg.pid(), prov.redis.pid())
    prov.stop_all()
    assert not prov.pg.is_running() and not prov.redis.is_running()
    again = Provisioner(data_dir)
    assert (again.pg.port, again.redis.port) == (prov.pg.port, prov.redis.port)
    again.ensure_shared_servers()
    again.ensure_dedicated_servers()
    assert (again.pg.pid(), again.redis.pid()) != pids
    _pg(pg).close()
    with _redis(rd) as c:
        assert c.ping()
    with _redis(rs) as c:
        assert c.get(rs.env["REDIS_KEY_PREFIX"] + "k") == b"kept"
