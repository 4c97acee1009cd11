"""Acceptance 1 of issue 10 through the platform as `berth up` runs it (controller,
runner, broker, job workers, beat) with its data dir on a loop-mounted btrfs, driven
through the real CLI: a dedicated PostgreSQL addon made by the job workers is
snapshotted by `berth backup snapshot` under a bounded write load, `berth backup
restore --at <that second>` puts it back in place, and every row committed before the
snapshot is there (no gaps) and the server (and its PgBouncer) serve again. An
ordinary token is refused."""
from __future__ import annotations

import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import psycopg2
import pytest

from backup import btrfs
from messaging.shapes import State
from tests.conftest import forget_apps, new_apps_dir
from tests.e2e.conftest import Berth, start_platform
from tests.integration.test_backup_btrfs import btrfs_filesystems, pytestmark

assert pytestmark
APP = "vault"


@pytest.fixture(scope="module")
def btrfs_platform(venv_cache: Path, berth_root: Path):
    with btrfs_filesystems() as make:
        mnt = make("1G")
        apps = new_apps_dir(berth_root)
        data = mnt / "p"           # short: the unix sockets below must fit in 107 bytes
        p = start_platform(data, venv_cache, apps, jobs=True)
        try:
            yield p, mnt
        finally:
            p.stop()
            forget_apps(apps)


@pytest.mark.timeout(400)
def test_dedicated_postgres_snapshot_under_load_and_restore_through_the_cli(
        btrfs_platform, tmp_path):
    platform, mnt = btrfs_platform
    berth = Berth(platform, tmp_path / "cli")
    admin = Berth(platform, tmp_path / "cli-admin")
    backup_token = (platform.data_dir / "controller" / "backup-admin.token").read_text().strip()
    berth.env["BERTH_CLI_TOKEN"] = backup_token

    admin("apps", "create", APP)
    out = admin("addons", "create", "postgres", "--plan", "dedicated", "-a", APP,
                timeout=120).stdout
    addon = out.strip().splitlines()[-1]
    volume = f"addon-{addon}"
    direct = admin("config", "get", "DATABASE_DIRECT_URL", "-a", APP).stdout.strip()
    url = admin("config", "get", "DATABASE_URL", "-a", APP).stdout.strip()
    with closing(psycopg2.connect(direct)) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("CREATE TABLE t (id bigint PRIMARY KEY, pad text)")

    refused = admin("backup", "list", check=False)
    assert refused.returncode != 0 and "backup admins" in refused.stderr

    listed = berth("backup", "list").stdout
    assert volume in listed and "Snapshotter btrfs" in listed
    first = berth("backup", "snapshot", volume).stdout       # adopts the root: before load
    assert f"{volume}@" in first
    root = Path(berth.json("backup", "show", volume)["path"])
    assert btrfs.is_subvolume(root)

    stop, committed, errors = threading.Event(), [0], []

    def writer() -> None:
        try:
            with closing(psycopg2.connect(direct)) as conn, conn.cursor() as cur:
                conn.autocommit = True
                i = 0
                while not stop.is_set() and i < 100_000:          # bounded
                    i += 1
                    cur.execute("INSERT INTO t VALUES (%s, repeat('x', 100))", (i,))
                    committed[0] = i
        except psycopg2.Error as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(1.2)                                    # snapshot names are to the second
    before = committed[0]
    started = time.monotonic()
    made = berth("backup", "snapshot", volume).stdout
    took = time.monotonic() - started
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=10)
    after = committed[0]
    assert not errors, errors
    assert 0 < before < after
    name = made.split("Snapshot ")[1].split()[0]
    at = datetime.strptime(name.split("@")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    verified = berth("backup", "verify", volume, "--at", at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     timeout=120).stdout
    assert "files match the manifest" in verified and "PostgreSQL started" in verified

    out = berth("backup", "restore", volume, "--at", at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "--yes", timeout=120).stdout
    assert f"chosen {name}" in out and "kept as" in out
    deadline = time.monotonic() + 30
    while True:
        try:
            with closing(psycopg2.connect(url, connect_timeout=3)) as conn, \
                    conn.cursor() as cur:
                cur.execute("SELECT count(*), max(id), count(*) FILTER (WHERE id <= %s) "
                            "FROM t", (before,))
                count, top, old = cur.fetchone()
            break
        except psycopg2.OperationalError:
            assert time.monotonic() < deadline, "the restored server did not serve"
            time.sleep(0.2)
    assert old == before, "every row committed before the snapshot is there"
    assert count == top and before <= top <= after, "one consistent instant, no gaps"
    shown = berth.json("backup", "show", volume)
    assert len(shown["snapshots"]) == 3          # first, under load, the replaced data
    # the runner supervising the servers stopped them on command (not taken for a
    # crash and restarted on data being swapped) and serves them again
    log = (platform.data_dir / "logs" / "controller.log").read_text()
    assert "unserving addon server" in log and "addon servers resumed" in log
    def serving() -> list[str]:
        servers = admin.json("addons", "info", addon)["servers"]
        states = [State(s["state"]) for s in servers]
        assert len(states) == 2, servers                 # postgres and its PgBouncer
        return states if all(st is State.RUNNING for st in states) else []
    admin.wait_for(serving, 30, "the runner serving the restored servers again")

    # what a job worker does before adopting a server's root (ApiSupervisor): the
    # platform endpoint answers once the runner stopped serving it, and serves it again
    from controller.jobs import Api
    worker_api = Api(SimpleNamespace(public_url=platform.api_url, platform_token="",
                                     data_dir=str(platform.data_dir / "controller")))
    paused = worker_api.call("POST", f"/v1/platform/addons/{addon}/pause", {"seconds": 60})
    assert paused == {"paused": True, "supervised": True}
    assert admin.json("addons", "info", addon)["servers"] == []
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(direct, connect_timeout=2).close()
    worker_api.call("POST", f"/v1/platform/addons/{addon}/pause", {"seconds": 0})
    admin.wait_for(serving, 30, "served again after the pause")
    print(f"\nberth backup snapshot under writes: {took:.2f} s wall (CLI included); "
          f"{before} rows before, {top} restored, {after} at the end")


NOTES_PY = '''\
import os
from pathlib import Path
from types import SimpleNamespace
from flask import Flask, request

app = Flask(__name__)
NOTE = Path(os.environ["BERTH_DATA_DIR"]) / "note.txt"


@app.get("/note")
def read():
    return NOTE.read_text() if NOTE.exists() else "(none)"


@app.post("/note")
def write():
    NOTE.write_text(request.get_data(as_text=True))
    return "ok"
'''


@pytest.mark.timeout(400)
def test_app_data_dir_restored_in_place_with_its_instances_stopped_and_started(
        btrfs_platform, tmp_path):
    """The same for an app's data dir: `berth backup restore app-<app>` scales the app
    to 0, waits until no instance is reported, swaps the data in and scales it back;
    the app then serves what was in the snapshot."""
    import http.client

    platform, _ = btrfs_platform
    berth = Berth(platform, tmp_path / "cli")
    admin = Berth(platform, tmp_path / "cli-admin")
    berth.env["BERTH_CLI_TOKEN"] = \
        (platform.data_dir / "controller" / "backup-admin.token").read_text().strip()
    src = tmp_path / "notes"
    src.mkdir()
    (src / "app.py").write_text(NOTES_PY)
    (src / "requirements.txt").write_text("flask>=3\ngunicorn>=23\n")
    (src / "Procfile").write_text("web: gunicorn app:app --workers 1\n")
    admin("apps", "create", "notes")
    admin("push", str(src), "-a", "notes", timeout=300)

    def note(body: str | None = None) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", platform.ports.balancer, timeout=10)
        try:
            conn.request("POST" if body is not None else "GET", "/note", body=body,
                         headers={"Host": "notes.localhost"})
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200, (resp.status, text)
            return text
        finally:
            conn.close()

    admin.wait_for(lambda: note("kept") == "ok", 60, "the app serving")
    made = berth("backup", "snapshot", "app-notes").stdout
    name = made.split("Snapshot ")[1].split()[0]
    time.sleep(1.1)
    assert note("later") == "ok" and note() == "later"

    out = berth("backup", "restore", "app-notes", "--at", name.split("@")[1], "--yes",
                timeout=180).stdout
    assert "stopping the consumers" in out and "starting the consumers" in out
    assert admin.wait_for(lambda: note() == "kept", 90, "the app serving the restored data")
    shown = berth.json("backup", "show", "app-notes")
    assert shown["snapshotter"] == "rsync-link-dest"      # the runner's apps dir: not btrfs
    assert len(shown["snapshots"]) == 2
