"""The platform's addon jobs with everything real: `berth up`'s redis-server broker,
a Celery worker and beat (controller/jobs.py), the controller (its API and job queue)
and dbprovision's Provisioner making real PostgreSQL databases; no runner needed.

A worker killed half-way through a provisioning leaves an addon that the next attempt
finishes; rotation refuses the old password; destroy keeps a dump and drops the
database; the periodic quota check puts its findings in the app's log; after a
Sentinel failover the app gets the moved REDIS_URL in a new release (the Postgres ha
failover through the platform, with its hosts killed, is test_addon_hosts.py)."""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import Client
from cli.credentials import Credentials
from cli.localplatform import LocalPlatform, Ports

pytest.importorskip("dbprovision.service", reason="the provisioner is not built yet")
psycopg2 = pytest.importorskip("psycopg2")

RETRY = 3.0             # job_retry_seconds: an op with no word from a worker is resent


@pytest.fixture(scope="module")
def platform(berth_root: Path) -> Iterator[LocalPlatform]:
    saved = os.environ.get("BERTH_CONTROLLER_QUOTA_CHECK_SECONDS")
    os.environ["BERTH_CONTROLLER_QUOTA_CHECK_SECONDS"] = "1"
    os.environ["BERTH_CONTROLLER_HA_CHECK_SECONDS"] = "1"
    # database servers run as postgres/redis: their data dir must be reachable (o+x)
    p = LocalPlatform(berth_root / f"jp-{uuid.uuid4().hex[:8]}", Ports.free(),
                      runners=[], jobs=True, job_retry_seconds=RETRY)
    try:
        p.start()
        yield p
    finally:
        p.stop()
        os.environ.pop("BERTH_CONTROLLER_HA_CHECK_SECONDS", None)
        if saved is None:
            os.environ.pop("BERTH_CONTROLLER_QUOTA_CHECK_SECONDS", None)
        else:
            os.environ["BERTH_CONTROLLER_QUOTA_CHECK_SECONDS"] = saved


@pytest.fixture(scope="module")
def api(platform: LocalPlatform) -> Client:
    return Client(Credentials(platform.api_url, platform.admin_token), timeout=30)


def wait_addon(api: Client, addon_id: str, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    addon = api.get(f"/v1/addons/{addon_id}")["addon"]
    while not done(addon):
        assert time.monotonic() < deadline, f"timed out: {addon}"
        time.sleep(0.05)
        addon = api.get(f"/v1/addons/{addon_id}")["addon"]
    return addon


def ready(addon: dict[str, Any]) -> bool:
    assert addon["state"] != "failed", addon["error"]
    return addon["state"] == "ready" and addon["op"] is None


def url_of(api: Client, app: str, key: str = "DATABASE_URL") -> str:
    return api.get(f"/v1/apps/{app}/config")["config"][key]


def write_and_count(url: str, note: str) -> int:
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS notes (body text)")
            cur.execute("INSERT INTO notes VALUES (%s)", (note,))
            cur.execute("SELECT count(*) FROM notes")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_shared_postgres_ready_rotate_destroy(api: Client, platform: LocalPlatform):
    api.post("/v1/apps", {"name": "shop"})
    started = time.monotonic()
    addon = api.post("/v1/apps/shop/addons", {"engine": "postgres", "plan": "shared"})["addon"]
    assert addon["state"] == "provisioning"
    addon = wait_addon(api, addon["id"], ready)
    print(f"\nshared postgres, API request to ready: {time.monotonic() - started:.3f}s")
    url = url_of(api, "shop")
    assert write_and_count(url, "one") == 1
    assert "DATABASE_URL" in api.get("/v1/apps/shop/releases")["releases"][0]["addon_keys"]

    api.post(f"/v1/addons/{addon['id']}/rotate")
    wait_addon(api, addon["id"], ready)
    new_url = url_of(api, "shop")
    assert new_url != url
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(url, connect_timeout=5).close()
    assert "password authentication failed" in str(refused.value)
    assert write_and_count(new_url, "two") == 2

    api.post(f"/v1/addons/{addon['id']}/destroy", {"confirm": "shop"})
    assert "DATABASE_URL" not in api.get("/v1/apps/shop/config")["config"]
    gone = wait_addon(api, addon["id"], lambda a: a["state"] == "destroyed")
    assert gone["final_dump"] and Path(gone["final_dump"]).stat().st_size > 0
    assert "notes" in Path(gone["final_dump"]).read_bytes().decode(errors="replace")
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(new_url, connect_timeout=5).close()


def _kill_group(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_a_worker_killed_midway_leaves_an_addon_the_next_attempt_finishes(
        api: Client, platform: LocalPlatform):
    api.post("/v1/apps", {"name": "killed"})
    platform.stop_one("jobs-worker")
    addon = api.post("/v1/apps/killed/addons", {"engine": "postgres",
                                                "plan": "shared"})["addon"]
    queued = wait_addon(api, addon["id"], lambda a: a["attempts"] >= 1, 10)
    assert queued["state"] == "provisioning" and "queued" in queued["step"]

    platform.start_jobs_worker()
    worker = platform.procs["jobs-worker"]
    # kill it (SIGKILL, master and pool) as soon as it reports working on the addon
    working = wait_addon(api, addon["id"], lambda a: a["step"] not in (queued["step"],)
                         or a["state"] != "provisioning", 60)
    _kill_group(worker)
    print(f"\nkilled the worker at step {working['step']!r} ({working['state']})")
    platform.procs.pop("jobs-worker", None)

    platform.start_jobs_worker()
    done = wait_addon(api, addon["id"], ready, 60 + RETRY * 3)
    assert done["attempts"] >= 1
    assert write_and_count(url_of(api, "killed"), "after the kill") == 1


def app_log(api: Client, app: str) -> str:
    return "\n".join(api.stream(f"/v1/apps/{app}/logs?lines=200"))


def test_over_quota_is_logged_blocks_writes_and_comes_back(api: Client,
                                                           platform: LocalPlatform):
    api.post("/v1/apps", {"name": "hoarder"})
    addon = api.post("/v1/apps/hoarder/addons", {"engine": "postgres", "plan": "shared",
                                                 "quota_mb": 12})["addon"]
    addon = wait_addon(api, addon["id"], ready)
    url = url_of(api, "hoarder")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE junk (pad text)")
        # an empty database is ~7.5 MB; 20 MB of random hex (TOAST cannot shrink it)
        cur.execute("INSERT INTO junk SELECT (SELECT string_agg(md5(random()::text || i || g),"
                    " '') FROM generate_series(1, 64) i) FROM generate_series(1, 10000) g")
    conn.close()
    blocked = wait_addon(api, addon["id"], lambda a: a["quota_state"] == "blocked", 60)
    assert blocked["usage_mb"] > 12
    log = app_log(api, "hoarder")
    assert "over its storage quota" in log, log
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur, pytest.raises(psycopg2.Error) as refused:
        cur.execute("INSERT INTO junk VALUES ('more')")
    print(f"\nwrite over quota: {refused.value}")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM junk")            # reads still work
        assert cur.fetchone()[0] == 10000
        cur.execute("DELETE FROM junk")                      # and deletes
    conn.close()
    wait_addon(api, addon["id"], lambda a: a["quota_state"] in ("restored", "ok"), 60)
    assert "writes work again" in app_log(api, "hoarder")
    assert write_and_count(url, "fits again") == 1


MAX_WRITES = 20_000         # the writer below is bounded in count ...
MAX_SECONDS = 90            # ... and in time


def writer(url: str, acked: list[int], after: list[float], stop: Any,
           pause: float = 0.0) -> None:
    """Insert through the app's DATABASE_URL (PgBouncer) one row at a time (`pause`
    seconds apart), keeping the ids whose COMMIT returned."""
    deadline = time.monotonic() + MAX_SECONDS
    conn = None
    for i in range(MAX_WRITES):
        if stop.is_set() or time.monotonic() > deadline:
            break
        try:
            if conn is None:
                conn = psycopg2.connect(url, connect_timeout=3)
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("INSERT INTO acked VALUES (%s)", (i,))
            acked.append(i)
            after.append(time.monotonic())
        except psycopg2.Error:
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)
        time.sleep(pause)
    if conn is not None:
        conn.close()


def test_ha_redis_sentinel_failover_moves_redis_url(api: Client, platform: LocalPlatform):
    from urllib.parse import urlsplit

    import redis

    from dbprovision.names import addon_name
    from dbprovision.service import Provisioner

    api.post("/v1/apps", {"name": "cachey"})
    addon = api.post("/v1/apps/cachey/addons", {"engine": "redis", "plan": "ha"})["addon"]
    addon = wait_addon(api, addon["id"], ready, 180)
    url = url_of(api, "cachey", "REDIS_URL")
    with redis.Redis.from_url(url) as r:
        r.set("before", "1")
        assert r.execute_command("WAIT", 1, 2000) == 1
    prov = Provisioner(platform.data_dir / "addons")
    ha = prov._redis_ha(prov._record(addon["id"], addon_name(addon["id"])))
    primary = ha.primary_node(addon_name(addon["id"]))
    assert primary.address == urlsplit(url).hostname
    pid = primary.pid()
    assert pid is not None
    # the primary's host stops answering (SIGSTOP: a killed one would be started
    # again at once by the job worker on this one machine); its Sentinels promote
    # the replica, and it comes back as a replica of the new primary
    os.kill(pid, signal.SIGSTOP)
    killed = time.monotonic()
    deadline = killed + 90
    try:
        while url_of(api, "cachey", "REDIS_URL") == url:
            assert time.monotonic() < deadline, "REDIS_URL never followed the Sentinels"
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    new_url = url_of(api, "cachey", "REDIS_URL")
    print(f"\nha redis through the platform: REDIS_URL moved "
          f"{time.monotonic() - killed:.1f} s after the kill")
    assert urlsplit(new_url).hostname != urlsplit(url).hostname
    with redis.Redis.from_url(new_url) as r:
        assert r.get("before") == b"1"
        assert r.set("after", "1")
    assert f"addon {addon['id']} moved" in app_log(api, "cachey")
