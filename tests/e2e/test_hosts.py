"""Many hosts on one machine: two runners (127.0.0.2 and 127.0.0.3), one app with two
web instances. They spread (one per host); `berth hosts drain` moves everything off a
host with no failed request under a steady load; a host partitioned away (SIGSTOP of
its runner and its instances past the failure timeout) has its instance replaced on
the other host, and when it comes back (SIGCONT) its stale instance is stopped, and
no route ever held both generations. Bounded loads, real everything."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import Client
from cli.credentials import Credentials
from cli.localplatform import LocalPlatform
from tests.e2e.conftest import Berth, serve_example, start_platform
from tests.e2e.test_supervision import Load

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path,
              berth_root: Path) -> Iterator[tuple[LocalPlatform, Berth]]:
    from tests.conftest import forget_apps, new_apps_dir
    apps = new_apps_dir(berth_root)
    platform = start_platform(tmp_path_factory.mktemp("hosts"), venv_cache, apps,
                              runners=[("runner-1", "127.0.0.2"), ("runner-2", "127.0.0.3")])
    try:
        yield platform, serve_example(platform, tmp_path_factory)
    finally:
        platform.stop()
        forget_apps(apps)


def running(b: Berth) -> list[dict[str, Any]]:
    return [i for i in b.json("ps", "-a", "steady")["instances"] if i["state"] == "RUNNING"]


def under_load(platform: LocalPlatform) -> tuple[Load, threading.Thread]:
    load = Load(platform.ports.balancer, "steady.localhost")
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    return load, thread


def test_instances_spread_and_a_drain_fails_no_request(two_hosts: Any) -> None:
    platform, b = two_hosts
    assert sorted(i["host"] for i in running(b)) == ["runner-1", "runner-2"]
    hosts = b.json("hosts")["runners"]
    assert hosts["runner-2"]["roles"] == ["app", "db"] and not hosts["runner-2"]["draining"]

    load, thread = under_load(platform)
    try:
        b.wait_for(lambda: sum(ok for _, ok, _ in load.results) >= 20, 30, "answers")
        started = time.monotonic()
        out = b("hosts", "drain", "runner-2", "--timeout", "120")
        took = time.monotonic() - started
        assert "runner-2 is empty" in out.stdout + out.stderr
        b.wait_for(lambda: len(running(b)) == 2, 60, "two RUNNING again")
        time.sleep(1.0)
    finally:
        load.stopping.set()
        thread.join(10)
    failed = [what for _, ok, what in load.since(started) if not ok]
    print(f"\ndrain of runner-2: {took:.1f} s, {len(failed)} of "
          f"{len(load.since(started))} requests failed")
    assert {i["host"] for i in running(b)} == {"runner-1"}
    assert b.json("hosts")["runners"]["runner-2"]["draining"] is True
    assert not failed, failed
    b("hosts", "drain", "runner-2", "--undo")
    # it takes work again: one more instance goes there (spread)
    b("scale", "web=3", "-a", "steady")
    b.wait_for(lambda: "runner-2" in {i["host"] for i in running(b)}, 120,
               "an instance on runner-2 again")
    b("scale", "web=2", "-a", "steady")
    b.wait_for(lambda: len(running(b)) == 2, 60, "two RUNNING")


def test_a_partitioned_host_is_fenced_when_it_returns(two_hosts: Any) -> None:
    platform, b = two_hosts
    api = Client(Credentials(platform.api_url, platform.admin_token), timeout=10)
    b.wait_for(lambda: {i["host"] for i in running(b)} == {"runner-1", "runner-2"}, 120,
               "one instance on each host")
    stale = next(i for i in running(b) if i["host"] == "runner-2")
    routes: list[tuple[float, set[str]]] = []
    watching = threading.Event()

    def watch() -> None:                        # every route the controller publishes
        deadline = time.monotonic() + 120
        while not watching.is_set() and time.monotonic() < deadline:
            table = api.get("/v1/routes")["routes"].get("steady") or {}
            routes.append((time.monotonic(), {x["id"] for x in table.get("backends", [])}))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    runner = platform.procs["runner-2"]
    frozen = [runner.pid, stale["pid"]]
    try:
        for pid in frozen:                      # the host stops answering, all of it
            os.killpg(pid, signal.SIGSTOP) if pid == stale["pid"] else os.kill(
                pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # the controller calls it lost, and the instance starts on runner-1
        b.wait_for(lambda: any(not ids & {stale["instance"]} and ids
                               for t, ids in routes if t > stopped), 30,
                   "routes without the partitioned host's instance")
        dropped = next(t for t, ids in routes if t > stopped and
                       stale["instance"] not in ids) - stopped
        b.wait_for(lambda: len([i for i in running(b) if i["host"] == "runner-1"]) == 2,
                   60, "the replacement RUNNING on runner-1")
        replaced = time.monotonic() - stopped
    finally:
        for pid in frozen:
            try:
                os.killpg(pid, signal.SIGCONT) if pid == stale["pid"] else os.kill(
                    pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # back: its stale instance is stopped, not routed, not kept
    b.wait_for(lambda: stale["instance"] not in {i["instance"] for i in b.json(
        "ps", "-a", "steady")["instances"]}, 60, "the stale instance stopped")
    time.sleep(1.0)
    watching.set()
    watcher.join(10)
    print(f"\npartition of runner-2: routes without it {dropped:.1f} s after the stop, "
          f"replacement RUNNING after {replaced:.1f} s")
    after = [ids for t, ids in routes if t > stopped + dropped]
    assert all(stale["instance"] not in ids for ids in after), "the stale one was routed"
    assert len(running(b)) == 2 and {i["host"] for i in running(b)} == {"runner-1"}
