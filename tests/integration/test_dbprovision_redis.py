"""Shared and dedicated Redis, by attempt: real redis-server processes, two tenants on
the shared one; every attempt past a tenant's walls must meet Redis's own refusal
(NOPERM, WRONGPASS)."""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dbprovision.names import addon_name
from dbprovision.ports import free_port
from dbprovision.redisdedicated import RedisDedicated
from dbprovision.redisserver import RedisServer
from dbprovision.redisshared import RedisShared

pytestmark = pytest.mark.timeout(60)

NO_RETRY = Retry(NoBackoff(), 0)     # a refusal is the answer, not a glitch to retry
NOPERM_KEYS = "no permissions to access one of the keys used as arguments"


@pytest.fixture(scope="module")
def workdir(berth_root: Path) -> Path:
    root = berth_root / f"redis-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o711)
    return root


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[RedisServer]:
    s = RedisServer(workdir / "shared", "127.0.0.1", free_port("127.0.0.1"))
    s.configure()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shared(server: RedisServer) -> RedisShared:
    return RedisShared(server)


class Tenant:
    def __init__(self, shared: RedisShared, label: str) -> None:
        self.name = addon_name(f"{label}-{uuid.uuid4().hex[:6]}")
        self.password = uuid.uuid4().hex
        self.port = shared.server.port
        shared.create(self.name, self.password)

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=self.name,
                           password=password or self.password, socket_timeout=5,
                           retry=NO_RETRY)

    def key(self, suffix: str) -> str:
        return f"{self.name}:{suffix}"


@pytest.fixture(scope="module")
def a(shared: RedisShared) -> Tenant:
    return Tenant(shared, "a")


@pytest.fixture(scope="module")
def b(shared: RedisShared) -> Tenant:
    t = Tenant(shared, "b")
    with t.client() as c:
        c.set(t.key("secret"), "only b may read this")
        c.rpush(t.key("queue"), "job")
    return t


def _noperm(client: redis.Redis, *command: str) -> str:
    with pytest.raises(redis.exceptions.NoPermissionError) as caught:
        client.execute_command(*command)
    return str(caught.value)


# -- shared: the key and channel walls ----------------------------------------------------

def test_a_works_under_its_own_prefix(a: Tenant):
    with a.client() as c:
        c.set(a.key("k"), "v")
        assert c.get(a.key("k")) == b"v"
        assert c.eval("return redis.call('incr', KEYS[1])", 1, a.key("n")) == 1


def test_a_cannot_read_bs_keys(a: Tenant, b: Tenant):
    with a.client() as c:
        assert NOPERM_KEYS in _noperm(c, "GET", b.key("secret"))
        assert NOPERM_KEYS in _noperm(c, "LRANGE", b.key("queue"), "0", "-1")
        assert NOPERM_KEYS in _noperm(c, "DUMP", b.key("secret"))
        assert NOPERM_KEYS in _noperm(c, "EVAL", "return redis.call('get', KEYS[1])", "1",
                                      b.key("secret"))


def test_a_cannot_write_bs_keys(a: Tenant, b: Tenant):
    with a.client() as c:
        assert NOPERM_KEYS in _noperm(c, "SET", b.key("secret"), "overwritten")
        assert NOPERM_KEYS in _noperm(c, "DEL", b.key("secret"))
        assert NOPERM_KEYS in _noperm(c, "RENAME", a.key("k2"), b.key("stolen"))
        assert NOPERM_KEYS in _noperm(c, "COPY", b.key("secret"), a.key("copy"))
        # a key without the prefix is nobody's: refused as well
        assert NOPERM_KEYS in _noperm(c, "SET", "unprefixed", "x")
    with b.client() as c:
        assert c.get(b.key("secret")) == b"only b may read this"


def test_a_cannot_use_bs_channels(a: Tenant, b: Tenant):
    with a.client() as c:
        assert "channels used as arguments" in _noperm(c, "PUBLISH", b.key("events"), "x")
    pubsub = a.client().pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.subscribe(b.key("events"))
        pubsub.get_message(timeout=1)
    pubsub.close()


@pytest.mark.parametrize("command", [
    ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",), ("DBSIZE",), ("FLUSHALL",), ("FLUSHDB",),
    ("CONFIG", "GET", "*"), ("CONFIG", "SET", "maxmemory", "0"),
    ("SHUTDOWN",), ("MONITOR",), ("INFO",), ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "USER", "default"), ("ACL", "LIST"), ("ACL", "SETUSER", "x", "on"),
    ("PUBSUB", "CHANNELS"), ("PUBSUB", "NUMSUB", "x"), ("SCRIPT", "FLUSH"),
    ("FUNCTION", "LIST"), ("SWAPDB", "0", "1"), ("SAVE",), ("BGSAVE",), ("SLOWLOG", "GET"),
    ("MEMORY", "STATS"), ("CLIENT", "TRACKING", "on", "BCAST"), ("REPLICAOF", "127.0.0.1", "1"),
])
def test_shared_tenant_cannot_run(a: Tenant, command: tuple[str, ...]):
    with a.client() as c:
        assert "no permissions to run the" in _noperm(c, *command)


def test_default_user_is_off(server: RedisServer):
    with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5,
                     retry=NO_RETRY) as c, \
            pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()


def test_a_cannot_log_in_as_b(a: Tenant, b: Tenant):
    with b.client(password=a.password) as c, \
            pytest.raises(redis.exceptions.AuthenticationError) as caught:
        c.ping()
    assert "invalid username-password pair" in str(caught.value)


def test_usage_counts_only_the_tenants_keys(shared: RedisShared):
    t = Tenant(shared, "usage")
    assert shared.usage_bytes(t.name) == 0
    with t.client() as c:
        c.set(t.key("big"), "x" * 100_000)
    assert 100_000 <= shared.usage_bytes(t.name) < 200_000
    shared.drop(t.name)


def test_rotate_refuses_the_old_password(shared: RedisShared):
    t = Tenant(shared, "rotate")
    old = t.client()
    old.ping()
    shared.rotate(t.name, "new-" + t.password)
    with t.client() as c, pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()
    with t.client(password="new-" + t.password) as c:
        assert c.ping()
    assert old.ping()           # an open connection stays (rolling releases)
    old.close()
    shared.drop(t.name)


def test_drop_dumps_removes_user_and_keys(shared: RedisShared, server: RedisServer,
                                          tmp_path: Path):
    t = Tenant(shared, "drop")
    other = Tenant(shared, "keep")
    with t.client() as c, other.client() as o:
        c.set(t.key("a"), "1")
        c.set(t.key("b"), "2", px=600_000)
        o.set(other.key("a"), "stays")
    held = t.client()
    held.ping()
    dump = tmp_path / "final.jsonl"
    shared.drop(t.name, final_dump=dump)
    shared.drop(t.name)
    entries = [json.loads(line) for line in dump.read_text().splitlines()]
    assert sorted(base64.b64decode(e["key"]).decode() for e in entries) == \
        [t.key("a"), t.key("b")]
    with server.admin(decode=False) as admin:
        assert admin.keys(f"{t.name}:*") == []
        assert admin.get(other.key("a")) == b"stays"
        for e in entries:       # the dump loads back with RESTORE
            admin.restore(base64.b64decode(e["key"]), e["ttl_ms"],
                          base64.b64decode(e["value"]))
        assert admin.get(t.key("a")) == b"1"
        admin.delete(t.key("a"), t.key("b"))
    with pytest.raises(redis.exceptions.ConnectionError):
        held.ping()             # DELUSER closed its connections
    with t.client() as c, pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()
    shared.drop(other.name)


def test_users_survive_a_restart(shared: RedisShared, server: RedisServer, a: Tenant):
    with a.client() as c:
        c.set(a.key("durable"), "yes")
    server.stop()
    assert not server.is_running()
    server.start()
    with a.client() as c:
        assert c.get(a.key("durable")) == b"yes"


# -- dedicated -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dedicated(workdir: Path) -> Iterator[tuple[RedisDedicated, Tenant]]:
    d = RedisDedicated(workdir / "dedicated", "127.0.0.1", free_port("127.0.0.1"),
                       maxmemory_mb=3)
    t = Tenant.__new__(Tenant)
    t.name, t.password, t.port = addon_name("ded"), uuid.uuid4().hex, d.port
    d.create(t.name, t.password)
    yield d, t
    d.destroy()


def test_dedicated_tenant_owns_its_keyspace(dedicated):
    _, t = dedicated
    with t.client() as c:
        c.set("any-key", "1")
        assert c.keys("*") == [b"any-key"]
        c.flushall()
        assert c.dbsize() == 0


@pytest.mark.parametrize("command", [
    ("CONFIG", "SET", "maxmemory", "0"), ("CONFIG", "GET", "dir"), ("SHUTDOWN", "NOSAVE"),
    ("ACL", "SETUSER", "default", "on", "nopass"),
    ("REPLICAOF", "127.0.0.1", "1"), ("MONITOR",), ("BGSAVE",),
    ("MIGRATE", "127.0.0.1", "1", "k", "0", "100"),
])
def test_dedicated_tenant_cannot_administer(dedicated, command: tuple[str, ...]):
    _, t = dedicated
    with t.client() as c:
        assert "no permissions to run the" in _noperm(c, *command)


@pytest.mark.parametrize("command", [("DEBUG", "SLEEP", "0"), ("MODULE", "LOAD", "/tmp/x.so")])
def test_debug_and_module_are_off_on_both(a: Tenant, dedicated, command: tuple[str, ...]):
    """Switched off in the config (enable-debug-command/enable-module-command no), so
    Redis refuses them before it even looks at the ACL."""
    for client in (a.client(), dedicated[1].client()):
        with client as c, pytest.raises(redis.exceptions.ResponseError) as caught:
            c.execute_command(*command)
        assert "command not allowed" in str(caught.value)


def test_dedicated_maxmemory_and_aof(dedicated):
    d, t = dedicated
    with t.client() as c:
        with pytest.raises(redis.exceptions.OutOfMemoryError) as caught:
            for i in range(100):
                c.set(f"fill:{i}", "x" * 100_000)
        assert "command not allowed when used memory > 'maxmemory'" in str(caught.value)
        c.flushall()
        c.set("durable", "yes")
    assert any((d.server.root / "appendonly").iterdir())
    d.server.stop()
    d.ensure_running()
    with t.client() as c:
        assert c.get("durable") == b"yes"


def test_dedicated_default_user_off_and_rotation(dedicated):
    d, t = dedicated
    with redis.Redis(host="127.0.0.1", port=d.port, socket_timeout=5,
                     retry=NO_RETRY) as c, \
            pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()
    d.rotate(t.name, "new-" + t.password)
    with t.client() as c, pytest.raises(redis.exceptions.AuthenticationError):
        c.ping()
    d.rotate(t.name, t.password)


def test_dedicated_destroy_keeps_an_rdb(workdir: Path, tmp_path: Path):
    d = RedisDedicated(workdir / "short", "127.0.0.1", free_port("127.0.0.1"))
    d.create("addon_short_1", "pw")
    pid = d.server.pid()
    assert pid is not None
    with redis.Redis(port=d.port, username="addon_short_1", password="pw") as c:
        c.set("k", "v")
    d.destroy(final_dump=tmp_path / "final.rdb")
    assert (tmp_path / "final.rdb").read_bytes()[:5] == b"REDIS"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not d.server.root.exists()
    d.destroy()
