"""The ha plans by attempt: kill -9 the primary under a bounded write load; the
standby (Postgres: promoted by the watcher; Redis: by its Sentinels) takes over, the
client keeps writing through its unchanged URL, and every acknowledged write is there.
Hosts are loopback addresses (127.0.0.2, 127.0.0.3, 127.0.0.4), each node its own dir.
Figures are printed (run with -s to see them)."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
import redis
from redis.sentinel import Sentinel

from dbprovision.errors import ServerUnavailable
from dbprovision.names import addon_name
from dbprovision.service import Credentials, Provisioner

pytestmark = pytest.mark.timeout(240)

MAX_SECONDS = 40            # every load is bounded in time ...
MAX_WRITES = 50_000         # ... and in count
AFTER_SWITCH = 50           # writes acknowledged after the switch, then the writer stops


@pytest.fixture(scope="module")
def prov(berth_root: Path) -> Iterator[Provisioner]:
    data_dir = berth_root / f"ha-{uuid.uuid4().hex[:8]}"
    p = Provisioner(data_dir)
    yield p
    Provisioner(data_dir).stop_all()


def _connect(url: str) -> psycopg2.extensions.connection:
    parts = urlsplit(url)
    conn = psycopg2.connect(host=parts.hostname, port=parts.port, user=parts.username,
                            password=parts.password, dbname=parts.path.lstrip("/"),
                            connect_timeout=2)
    conn.autocommit = True
    return conn


@dataclass
class Load:
    acked: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)     # when each acked write returned
    errors: int = 0
    switched_at: float = float("inf")
    switched: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def window(self, killed: float) -> float:
        """From the last acknowledged write before the kill to the first after it."""
        before = max(t for t in self.times if t <= killed)
        after = min(t for t in self.times if t > killed)
        return after - before

    def after(self, killed: float) -> int:
        return sum(1 for t in self.times if t > killed)


def _pg_writer(url: str, load: Load) -> None:
    deadline = time.monotonic() + MAX_SECONDS
    conn = None
    for i in range(MAX_WRITES):
        if load.stop.is_set() or time.monotonic() > deadline:
            break
        if load.switched.is_set() and sum(1 for t in load.times[-AFTER_SWITCH:]
                                          if t > load.switched_at) >= AFTER_SWITCH:
            break
        try:
            if conn is None:
                conn = _connect(url)
            with conn.cursor() as cur:
                cur.execute("INSERT INTO acked (id) VALUES (%s)", (i,))
            load.acked.append(i)                # the COMMIT (autocommit) returned
            load.times.append(time.monotonic())
        except psycopg2.Error:
            load.errors += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.02)
    if conn is not None:
        conn.close()


def test_pg_ha_credentials_and_sync_standby(prov: Provisioner):
    addon = f"hacred-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    creds = prov.provision(addon, "postgres", "ha")
    print(f"\npostgres ha provisioned in {time.monotonic() - started:.2f} s")
    assert urlsplit(creds.env["DATABASE_URL"]).port == creds.port       # PgBouncer
    assert urlsplit(creds.env["DATABASE_READ_URL"]).hostname == "127.0.0.3"
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
        cur.execute("INSERT INTO t VALUES (1)")
    with closing(_connect(creds.env["DATABASE_READ_URL"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), (SELECT count(*) FROM t)")
        assert cur.fetchone() == (True, 1)          # synchronous: already there
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO t VALUES (2)")
    ha = prov._pg_ha(prov._record(addon, addon_name(addon)))
    with closing(ha.node("a").connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT application_name, sync_state FROM pg_stat_replication")
        assert cur.fetchall() == [("node_b", "quorum")]
        cur.execute("SELECT slot_name, active FROM pg_replication_slots")
        assert cur.fetchall() == [("node_b", True)]
        cur.execute("SHOW max_slot_wal_keep_size")
        assert cur.fetchone() == ("1GB",)
    assert prov.check_primary(addon) and addon in prov.ha_addons()
    prov.destroy(addon, "postgres", "ha")


def test_pg_failover_by_attempt(prov: Provisioner):
    addon = f"hafail-{uuid.uuid4().hex[:6]}"
    creds = prov.provision(addon, "postgres", "ha")
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
    ha = prov._pg_ha(prov._record(addon, addon_name(addon)))
    old = ha.node("a")
    load = Load()
    writer = threading.Thread(target=_pg_writer, args=(creds.url, load), daemon=True)
    writer.start()
    deadline = time.monotonic() + 15
    while len(load.acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(load.acked) >= 200, "the writer did not get going"

    pid = old.pid()
    assert pid is not None
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)            # the primary's host dies
    assert prov.watch(addon, failures=3, interval=0.2, max_seconds=20)
    load.switched_at = time.monotonic()
    load.switched.set()
    writer.join(MAX_SECONDS + 5)
    load.stop.set()

    assert load.after(killed) >= AFTER_SWITCH, "no writes after the switch"
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:   # the same URL
        cur.execute("SELECT id FROM acked")
        present = {row[0] for row in cur.fetchall()}
        cur.execute("SELECT inet_server_addr()")
        assert cur.fetchone()[0] == "127.0.0.3"
    lost = set(load.acked) - present
    print(f"\npostgres ha failover: {len(load.acked)} acknowledged, {len(lost)} lost, "
          f"window {load.window(killed):.2f} s (kill to promotion "
          f"{load.switched_at - killed:.2f} s), {load.errors} failed attempts")
    assert not lost

    # fenced: not running, its data dir renamed, so nothing starts it as a primary
    assert not old.is_running() and not old.initialized()
    assert (old.root / "data.fenced").is_dir()
    state = ha.state()
    assert float(state.pop("fenced_at")) <= time.time()
    assert state == {"primary": "b", "fenced": "a", "sync": "off"}
    # no standby while one is fenced: reads go to the primary
    assert urlsplit(prov.credentials(prov._record(addon, addon_name(addon))).env[
        "DATABASE_READ_URL"]).hostname == "127.0.0.3"

    started = time.monotonic()
    creds = prov.rejoin(addon)              # rebuilt as the new standby, synchronous again
    print(f"old primary rebuilt as standby in {time.monotonic() - started:.2f} s")
    assert urlsplit(creds.env["DATABASE_READ_URL"]).hostname == "127.0.0.2"
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO acked (id) VALUES (-1)")
    with closing(_connect(creds.env["DATABASE_READ_URL"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), count(*) FROM acked WHERE id = -1")
        assert cur.fetchone() == (True, 1)
    prov.destroy(addon, "postgres", "ha")


def test_pg_dead_standby_degrades_then_rejoins(prov: Provisioner):
    """A dead standby would hold every COMMIT (synchronous): the watcher lets the
    primary commit alone, and then refuses to promote that (behind) standby."""
    addon = f"hadeg-{uuid.uuid4().hex[:6]}"
    creds = prov.provision(addon, "postgres", "ha")
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (x int)")
    ha = prov._pg_ha(prov._record(addon, addon_name(addon)))
    pid = ha.node("b").pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)                # the standby's host dies
    done = threading.Event()

    def insert() -> None:
        with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (1)")     # waits for a standby ...
        done.set()

    writer = threading.Thread(target=insert, daemon=True)
    writer.start()
    assert not done.wait(0.5)
    assert not prov.watch(addon, failures=3, interval=0.2, max_seconds=3)
    assert done.wait(5)                         # ... until the primary commits alone
    assert ha.state() == {"primary": "a", "fenced": "", "sync": "off"}
    with pytest.raises(ServerUnavailable, match="behind"):
        prov.failover(addon)
    creds = prov.rejoin(addon)                  # the standby back, synchronous again
    assert ha.state()["sync"] == "on"
    with closing(_connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (2)")
    with closing(_connect(creds.env["DATABASE_READ_URL"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM t")
        assert cur.fetchone() == (2,)
    prov.destroy(addon, "postgres", "ha")


# -- redis ha -------------------------------------------------------------------------

def _sentinel_client(creds: Credentials) -> tuple[Sentinel, str]:
    """A redis-py Sentinel client from REDIS_SENTINEL_URL
    (`redis+sentinel://user:pass@h1:p1,h2:p2,h3:p3/<service>`)."""
    rest = creds.env["REDIS_SENTINEL_URL"].removeprefix("redis+sentinel://")
    userinfo, rest = rest.split("@", 1)
    hosts, service = rest.split("/", 1)
    user, password = userinfo.split(":", 1)
    sentinels = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts.split(",")]
    auth = {"username": user, "password": password}
    return Sentinel(sentinels, sentinel_kwargs={**auth, "socket_timeout": 0.5},
                    socket_timeout=0.5, socket_connect_timeout=0.5, **auth), service


def test_redis_failover_by_attempt(prov: Provisioner):
    addon = f"hared-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    creds = prov.provision(addon, "redis", "ha")
    print(f"\nredis ha provisioned in {time.monotonic() - started:.2f} s")
    sentinel, service = _sentinel_client(creds)
    assert sentinel.discover_master(service) == ("127.0.0.2", creds.port)
    # the tenant may ask the Sentinels where the primary is, nothing more
    host, port = sentinel.sentinels[0].connection_pool.connection_kwargs["host"], \
        sentinel.sentinels[0].connection_pool.connection_kwargs["port"]
    with redis.Redis(host=host, port=port, username=urlsplit(creds.url).username,
                     password=urlsplit(creds.url).password) as s, \
            pytest.raises(redis.exceptions.NoPermissionError):
        s.execute_command("SENTINEL", "FAILOVER", service)
    with redis.Redis.from_url(creds.url) as plain:
        assert plain.set("plain", "1")
    primary = sentinel.master_for(service)

    acked: dict[int, float] = {}            # the primary acknowledged
    replicated: set[int] = set()            # ... and WAIT 1 said the replica has it
    errors = 0
    killed = switched = 0.0
    deadline = time.monotonic() + MAX_SECONDS
    ha = prov._redis_ha(prov._record(addon, addon_name(addon)))
    old_pid = ha.node(0).pid()
    assert old_pid is not None
    for i in range(MAX_WRITES):
        if time.monotonic() > deadline:
            break
        if i == 300:
            killed = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)        # the primary's host dies
        try:
            primary.set(f"k:{i}", i)
            acked[i] = time.monotonic()
            if primary.execute_command("WAIT", 1, 100) >= 1:
                replicated.add(i)
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
            errors += 1
            time.sleep(0.05)
            continue
        if killed and not switched:
            switched = time.monotonic()
        if switched and sum(1 for t in acked.values() if t > killed) >= AFTER_SWITCH:
            break
    assert switched, "no write after the kill"
    new_host, _ = sentinel.discover_master(service)
    assert new_host == "127.0.0.3"
    present = {int(k.split(b":")[1]) for k in primary.keys("k:*")}
    lost_acked = set(acked) - present
    lost_replicated = replicated - present
    before = max(t for t in acked.values() if t <= killed)
    print(f"redis ha failover: {len(acked)} acknowledged by the primary, "
          f"{len(replicated)} also by the replica (WAIT 1); lost: {len(lost_acked)} "
          f"acknowledged, {len(lost_replicated)} replicated; window "
          f"{switched - before:.2f} s; {errors} failed attempts")
    assert not lost_replicated
    # the plain REDIS_URL follows the new primary (a new release carries it)
    record = prov._record(addon, addon_name(addon))
    moved = prov.credentials(record)
    assert urlsplit(moved.env["REDIS_URL"]).hostname == "127.0.0.3"
    with redis.Redis.from_url(moved.env["REDIS_URL"]) as plain:
        assert plain.set("after-failover", "1")
    # destroy keeps a final dump taken on the primary of the moment
    dump = prov.data_dir / "dumps" / f"{addon}.rdb"
    prov.destroy(addon, "redis", "ha", final_dump=dump)
    assert dump.stat().st_size > 0 and b"after-failover" in dump.read_bytes()
    assert not ha.root.exists()
