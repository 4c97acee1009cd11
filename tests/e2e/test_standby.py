"""A standby controller: the store on a real PostgreSQL 15 (initdb into a temp dir),
two controllers on the same settings, one leader by a PostgreSQL advisory lock. kill -9
of the leader under a steady load through the balancer: the standby takes over (its
API answers the CLI, its heartbeats reach the runner, its routes are the same), no
request fails and no route is lost. Also: the store's SQL on PostgreSQL, and the
lease by attempt (a second holder waits; the first one's death frees it)."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from cli.client import Client
from cli.credentials import Credentials
from cli.localplatform import LocalPlatform, Ports
from controller.pgstore import LeaderLease
from controller.store import Store
from dbprovision.pgcluster import PgCluster
from dbprovision.ports import free_port
from tests.e2e.conftest import Berth, serve_example
from tests.e2e.test_supervision import Load

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def store_url(berth_root: Path) -> Iterator[str]:
    cluster = PgCluster(berth_root / f"st-{uuid.uuid4().hex[:6]}", "127.0.0.1",
                        free_port("127.0.0.1"))
    cluster.init()
    cluster.start()
    try:
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE berth_store")
        yield (f"postgresql:///berth_store?host={cluster.data}&port={cluster.port}"
               "&user=postgres")
    finally:
        cluster.stop()


def test_the_store_runs_on_postgresql_and_the_lease_elects_one(store_url: str,
                                                               tmp_path: Path) -> None:
    one = Store(tmp_path / "unused.db", store_url)
    one.create_app("pgapp")
    rel = one.change_config("pgapp", {"GREETING": "hi"})
    two = Store(tmp_path / "unused2.db", store_url)     # a second controller's view
    assert two.current_release("pgapp").config == {"GREETING": "hi"}
    assert two.current_release("pgapp").version == rel.version
    assert two.schema_version() == one.schema_version()
    with pytest.raises(RuntimeError), two._tx():        # a transaction rolls back whole
        two.create_app("half")
        raise RuntimeError("boom")
    assert "half" not in one.list_apps()

    first, second = LeaderLease(store_url, "a"), LeaderLease(store_url, "b")
    assert first.acquire()
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    assert second.acquire(stop) is False                 # the leader holds it
    first.close()                                        # the leader's connection dies
    assert second.acquire() and second.held()
    second.close()


@pytest.fixture(scope="module")
def pair(store_url: str, tmp_path_factory: pytest.TempPathFactory, venv_cache: Path,
         berth_root: Path) -> Iterator[tuple[LocalPlatform, Berth]]:
    from tests.conftest import forget_apps, new_apps_dir
    apps = new_apps_dir(berth_root)
    platform = LocalPlatform(tmp_path_factory.mktemp("standby"), Ports.free(),
                             runners=[("runner-1", "127.0.0.2")],
                             wheel_cache_dir=str(venv_cache), apps_dir=str(apps),
                             drain_seconds=1.0, jobs=False, store_url=store_url)
    try:
        platform.start()
        platform.start_standby_controller("controller-2")
        yield platform, serve_example(platform, tmp_path_factory)
    finally:
        platform.stop()
        forget_apps(apps)


def test_kill_9_of_the_leader_the_standby_takes_over(pair: Any) -> None:
    platform, b = pair
    api = Client(Credentials(platform.api_url, platform.admin_token), timeout=5)
    standby_log = platform.data_dir / "logs" / "controller-2.log"
    assert "standby" in standby_log.read_text()
    before = api.get("/v1/routes")["routes"]["steady"]
    load = Load(platform.ports.balancer, "steady.localhost")
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        b.wait_for(lambda: sum(ok for _, ok, _ in load.results) >= 20, 30, "answers")
        leader = platform.procs["controller"]
        killed = time.monotonic()
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(10)

        def answers() -> bool:
            try:
                return bool(Client(Credentials(platform.api_url, platform.admin_token),
                                   timeout=2).get("/v1/health"))
            except Exception:
                return False
        b.wait_for(answers, 60, "the standby's API")
        api_back = time.monotonic() - killed
        # it hears the runner and publishes the same route (after its warm-up)
        b.wait_for(lambda: (r := api.get("/v1/routes")["routes"].get("steady"))
                   and {x["id"] for x in r["backends"]} == {x["id"] for x in
                                                            before["backends"]},
                   60, "the same route from the new leader")
        took = time.monotonic() - killed
        out = b("ps", "-a", "steady")                   # the CLI keeps working
        assert out.stdout.count("RUNNING") + out.stdout.count("running") >= 2, out.stdout
        time.sleep(2.0)
    finally:
        load.stopping.set()
        thread.join(10)
    during = load.since(killed)
    failed = [what for _, ok, what in during if not ok]
    print(f"\nleader killed: standby API answering after {api_back:.1f} s, its route "
          f"published after {took:.1f} s; {len(failed)} of {len(during)} requests failed")
    assert "leader lease acquired" in standby_log.read_text()
    assert not failed, failed
