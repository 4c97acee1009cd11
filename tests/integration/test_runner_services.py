"""A runner supervises a dedicated addon's real servers (PostgreSQL and PgBouncer,
made by dbprovision's Provisioner) with the process state machine of app instances:
it adopts the servers the provisioner started, restarts a killed postmaster with
backoff (the tenant's log hears it, the data is all there), stops it with its fast
shutdown when told, and a runner restarted after a kill -9 adopts what the last one
started instead of starting a second server. Real runner process, real ZeroMQ
sockets (a stand-in controller end), real PostgreSQL 15 and PgBouncer."""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from dbprovision.names import addon_name
from dbprovision.service import Provisioner
from messaging.shapes import ServiceSpec
from tests.integration.test_runner import FakeController, RunnerProcess, SlugServer

pytestmark = pytest.mark.timeout(240)

STEP = 60.0


@pytest.fixture
def platform(berth_root: Path, tmp_path: Path, venv_cache: Path, apps_dir: Path
             ) -> Iterator[tuple[FakeController, SlugServer, Provisioner, Path]]:
    data = berth_root / f"sv-{uuid.uuid4().hex[:6]}"
    prov = Provisioner(data)
    ctl = FakeController()
    slugs = SlugServer({})
    try:
        yield ctl, slugs, prov, tmp_path
    finally:
        slugs.close()
        ctl.close()
        prov.stop_all()


def serve(ctl: FakeController, spec: ServiceSpec) -> dict[str, Any]:
    wire = {**spec.to_wire(), "app": "shop"}
    rep = ctl.reply(ctl.command("serve", service=wire))
    assert rep["ok"], rep
    return dict(rep["result"])


def services(ctl: FakeController) -> dict[str, dict[str, Any]]:
    beat = ctl.heartbeats[-1] if ctl.heartbeats else None
    return {s["instance"]: s for s in (beat.fields.get("services") or [])} if beat else {}


def state_of(ctl: FakeController, sid: str, state: str, **more: Any) -> Any:
    def check() -> Any:
        item = services(ctl).get(sid)
        return item if item and item["state"] == state and all(
            item.get(k) == v for k, v in more.items()) else None
    return ctl.wait_for(f"{sid} {state} {more}", check, STEP)


def count_rows(url: str) -> int:
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notes")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def alive(pid: int) -> bool:
    """Running (a zombie whose reaper is a container's pid 1 counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_runner_supervises_a_dedicated_postgres(platform: Any, venv_cache: Path,
                                                apps_dir: Path) -> None:
    ctl, slugs, prov, tmp = platform
    addon = f"postgres-{uuid.uuid4().hex[:6]}"
    creds = prov.provision(addon, "postgres", "dedicated")
    conn = psycopg2.connect(creds.url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE notes (body text)")
        cur.execute("INSERT INTO notes SELECT 'row ' || g FROM generate_series(1, 500) g")
    conn.close()
    specs = {s.kind: s for s in prov.services(addon)}
    assert set(specs) == {"postgres", "pgbouncer"}
    pg, bouncer = specs["postgres"], specs["pgbouncer"]
    cluster = prov._dedicated_pg(prov._record(addon, addon_name(addon))).cluster
    started_pid = cluster.pid()
    assert started_pid is not None

    (tmp / "r1").mkdir()
    runner = RunnerProcess(tmp / "r1", ctl, slugs, venv_cache, apps_dir=apps_dir)
    try:
        # the servers the provisioner started are adopted, not started again
        assert serve(ctl, pg)["adopted"] is True
        assert serve(ctl, bouncer)["adopted"] is True
        item = state_of(ctl, pg.id, "RUNNING")
        assert item["pid"] == started_pid and "adopted" in item["reason"]
        state_of(ctl, bouncer.id, "RUNNING")

        # kill -9 the postmaster: the runner starts it again (as postgres, not root)
        os.kill(started_pid, signal.SIGKILL)
        killed = time.monotonic()
        item = state_of(ctl, pg.id, "RUNNING", restarts=1)
        print(f"\npostgres killed -> RUNNING again in {time.monotonic() - killed:.1f} s "
              f"(pid {item['pid']})")
        assert item["pid"] != started_pid
        with open(f"/proc/{item['pid']}/status") as fh:
            uid = next(line.split()[1] for line in fh if line.startswith("Uid:"))
        assert int(uid) == cluster.user.uid != 0
        deadline = time.monotonic() + 20
        while True:                         # through PgBouncer, the app's URL
            try:
                assert count_rows(creds.url) == 500
                break
            except psycopg2.OperationalError:
                assert time.monotonic() < deadline, "the restarted server never answered"
                time.sleep(0.2)
        lines = [m["line"] for m in ctl.log_lines if m.fields.get("app") == "shop"]
        assert any(f"postgres.{pg.id} BACKOFF" in line for line in lines), lines

        # a runner killed with -9 leaves the servers running; the next adopts them
        pid = item["pid"]
        runner.proc.kill()
        runner.proc.wait(10)
        assert alive(pid)
        ctl.runner_identity = None
        ctl.heartbeats.clear()
        runner.stderr.close()
        runner = RunnerProcess(tmp / "r1", ctl, slugs, venv_cache, apps_dir=apps_dir)
        assert serve(ctl, pg)["adopted"] is True
        assert state_of(ctl, pg.id, "RUNNING")["pid"] == pid

        # unserve: a fast shutdown (SIGINT), the server leaves the heartbeat
        rep = ctl.reply(ctl.command("unserve", service=pg.id))
        assert rep["result"] == {"stopping": True, "known": True}
        ctl.wait_for(f"{pg.id} gone", lambda: pg.id not in services(ctl) and
                     bool(ctl.heartbeats), STEP)
        assert not alive(pid)
        assert "database system is shut down" in Path(pg.log_file).read_text()
        assert "fast shutdown request" in Path(pg.log_file).read_text()
    finally:
        code = runner.terminate()           # stops the servers it still supervises
        runner.stderr.close()
        if code != 0:
            print(runner.log_text()[-4000:])
    assert code == 0
    assert bouncer.id not in services(ctl) or not services(ctl)
    prov.destroy(addon, "postgres", "dedicated")


def test_a_malformed_service_is_refused_with_a_reason(platform: Any, venv_cache: Path,
                                                      apps_dir: Path) -> None:
    ctl, slugs, _, tmp = platform
    runner = RunnerProcess(tmp, ctl, slugs, venv_cache, apps_dir=apps_dir)
    try:
        rep = ctl.reply(ctl.command("serve", service={
            "id": "x", "addon": "x", "app": "shop", "kind": "postgres",
            "argv": ["relative/postgres"], "cwd": "/tmp", "user": "postgres",
            "address": "127.0.0.1", "port": 5432}))
        assert not rep["ok"]
        assert "absolute" in rep["error"]["message"]
    finally:
        assert runner.terminate() == 0
        runner.stderr.close()
