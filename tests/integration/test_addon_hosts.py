"""An ha PostgreSQL through the whole platform, its nodes on the two simulated db
hosts (runners with the db role on 127.0.0.5 and 127.0.0.6, each supervising its
node; PgBouncer on the app runner of 127.0.0.1), and the primary's host killed with
-9 under a bounded write load: its runner and its postmaster die together, nothing
restarts them. The periodic ha check (celery beat) promotes the standby, the app
keeps writing through its unchanged DATABASE_URL, and every acknowledged row is
there; reads move to the new primary while the old host is away; when the host
comes back its node is rebuilt as the standby, supervised by its runner again, and
DATABASE_READ_URL follows in a new release. Real everything: controller, three
runners, Redis broker, Celery worker and beat, PostgreSQL 15, PgBouncer."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest

from cli.client import Client
from cli.credentials import Credentials
from cli.localplatform import LocalPlatform, Ports
from tests.integration.test_addon_jobs import app_log, ready, url_of, wait_addon, writer

pytestmark = pytest.mark.timeout(420)

@pytest.fixture(scope="module")
def platform(berth_root: Path) -> Iterator[LocalPlatform]:
    os.environ["BERTH_CONTROLLER_HA_CHECK_SECONDS"] = "1"
    p = LocalPlatform(berth_root / f"hp-{uuid.uuid4().hex[:6]}", Ports.free(),
                      runners=[("runner-1", "127.0.0.1", "app"), ("db-a", "127.0.0.5", "db"),
                               ("db-b", "127.0.0.6", "db")], jobs=True,
                      job_retry_seconds=3.0)
    try:
        p.start()
        yield p
    finally:
        p.stop()
        os.environ.pop("BERTH_CONTROLLER_HA_CHECK_SECONDS", None)


def servers(api: Client, addon_id: str) -> dict[str, dict[str, Any]]:
    found = api.get(f"/v1/addons/{addon_id}")["addon"]["servers"]
    return {s["instance"].removeprefix(addon_id + "-"): s for s in found}


def wait_servers(api: Client, addon_id: str, want: dict[str, str],
                 timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Until each named server is RUNNING on the named runner."""
    deadline = time.monotonic() + timeout
    while True:
        got = servers(api, addon_id)
        if all(n in got and got[n]["state"] == "RUNNING" and got[n]["host"] == h
               for n, h in want.items()):
            return got
        assert time.monotonic() < deadline, f"servers not as wanted {want}: {got}"
        time.sleep(0.2)


def test_ha_primary_host_killed_under_load(platform: LocalPlatform):
    api = Client(Credentials(platform.api_url, platform.admin_token), timeout=30)
    api.post("/v1/apps", {"name": "bank"})
    addon = api.post("/v1/apps/bank/addons", {"engine": "postgres", "plan": "ha"})["addon"]
    addon_id = addon["id"]
    wait_addon(api, addon_id, ready, 180)
    # the nodes went to the db hosts, each supervised by its runner; PgBouncer by
    # 127.0.0.1's (the provisioner's address: the app's stable DATABASE_URL)
    before = wait_servers(api, addon_id, {"node-a": "db-a", "node-b": "db-b",
                                          "bouncer": "runner-1"})
    url, read_url = url_of(api, "bank"), url_of(api, "bank", "DATABASE_READ_URL")
    assert urlsplit(url).hostname == "127.0.0.1"
    assert urlsplit(read_url).hostname == "127.0.0.6"
    assert {before["node-a"]["address"], before["node-b"]["address"]} == \
        {"127.0.0.5", "127.0.0.6"}
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE acked (id int PRIMARY KEY)")
    conn.close()

    acked: list[int] = []
    times: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(url, acked, times, stop, 0.002),
                              daemon=True)
    thread.start()
    while len(acked) < 200:
        assert thread.is_alive(), "the writer stopped before the kill"
        time.sleep(0.01)

    # host 127.0.0.5 dies: its runner and its postmaster with every backend, kill -9
    postmaster = before["node-a"]["pid"]
    backends = [int(p) for p in subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True,
        check=True).stdout.split()]
    runner = platform.procs.pop("db-a")
    killed = time.monotonic()
    runner.kill()
    for pid in [postmaster, *backends]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    runner.wait(10)
    try:
        moved = wait_addon(api, addon_id, lambda a: "failed over" in (a["step"] or ""), 90)
        while sum(1 for t in times if t > killed) < 100:    # writes go on after it
            assert thread.is_alive(), "the writer gave up after the failover"
            time.sleep(0.05)
        gap = max(b - a for a, b in zip(times, times[1:], strict=False) if b > killed)
        print(f"\nprimary host killed: failover reported after "
              f"{time.monotonic() - killed:.1f} s; no acknowledged write for {gap:.2f} s")
        # while the host is away, reads go to the new primary; nothing rebuilds there
        assert url_of(api, "bank") == url
        deadline = time.monotonic() + 30
        while urlsplit(url_of(api, "bank", "DATABASE_READ_URL")).hostname != "127.0.0.6" \
                or "node-a" in servers(api, addon_id):
            assert time.monotonic() < deadline, (url_of(api, "bank", "DATABASE_READ_URL"),
                                                 servers(api, addon_id))
            time.sleep(0.2)
        assert "rebuilt" not in (api.get(f"/v1/addons/{addon_id}")["addon"]["step"] or "")
    finally:
        stop.set()
        thread.join(30)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM acked")
        present = {r[0] for r in cur.fetchall()}
    conn.close()
    lost = set(acked) - present
    print(f"{len(acked)} acknowledged, {len(lost)} lost ({moved['step']})")
    assert not lost

    # the host comes back: its node is rebuilt as the standby, served by its runner
    platform.start_runner("db-a", "127.0.0.5", roles="db")
    back = time.monotonic()
    wait_addon(api, addon_id, lambda a: "rebuilt" in (a["step"] or ""), 120)
    got = wait_servers(api, addon_id, {"node-a": "db-a", "node-b": "db-b"})
    assert got["node-a"]["pid"] != postmaster
    deadline = time.monotonic() + 30
    while urlsplit(url_of(api, "bank", "DATABASE_READ_URL")).hostname != "127.0.0.5":
        assert time.monotonic() < deadline, "DATABASE_READ_URL never followed the rebuild"
        time.sleep(0.2)
    print(f"old primary's host back: rebuilt as the standby and served in "
          f"{time.monotonic() - back:.1f} s")
    standby = psycopg2.connect(url_of(api, "bank", "DATABASE_READ_URL"), connect_timeout=5)
    with standby, standby.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery(), count(*) FROM acked")
        in_recovery, count = cur.fetchone()
    standby.close()
    assert in_recovery and count == len(present)
    log = app_log(api, "bank")
    assert f"addon {addon_id} moved: failed over to the standby" in log, log


def test_a_dedicated_postgres_goes_to_a_db_host_and_apps_never_do(platform: LocalPlatform):
    api = Client(Credentials(platform.api_url, platform.admin_token), timeout=30)
    api.post("/v1/apps", {"name": "shop"})
    addon = api.post("/v1/apps/shop/addons", {"engine": "postgres",
                                              "plan": "dedicated"})["addon"]
    wait_addon(api, addon["id"], ready, 120)
    deadline = time.monotonic() + 60
    while True:
        got = servers(api, addon["id"])
        if {n for n, s in got.items() if s["state"] == "RUNNING"} == {"postgres", "bouncer"}:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert {s["host"] for s in got.values()} <= {"db-a", "db-b"}
    assert got["postgres"]["address"] in ("127.0.0.5", "127.0.0.6")
    assert urlsplit(url_of(api, "shop")).hostname == got["postgres"]["address"]
    # a db-only runner refuses app work: the controller never sends it any
    hosts = api.get("/v1/hosts")["runners"]
    assert all(not info["inventory"] for name, info in hosts.items() if name != "runner-1")
