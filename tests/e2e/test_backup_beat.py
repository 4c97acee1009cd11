"""The scheduled path of issue 10 through `berth up`: celery beat has the job workers
snapshot every volume (here every 3 s, BERTH_CONTROLLER_BACKUP_SNAPSHOT_SECONDS) and
prune them; a dedicated PostgreSQL that a runner supervises has its root adopted as a
btrfs subvolume by a worker, which pauses it through the controller first (the
runner stops it on command and serves it again after, not a crash restart), and the
app keeps its data."""
from __future__ import annotations

import os
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest

from backup import btrfs
from messaging.shapes import State
from tests.conftest import forget_apps, new_apps_dir
from tests.e2e.conftest import Berth, start_platform
from tests.integration.test_backup_btrfs import btrfs_filesystems, pytestmark

assert pytestmark


@pytest.mark.timeout(300)
def test_beat_snapshots_adopt_a_supervised_server_and_prune(venv_cache: Path,
                                                            berth_root: Path, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("BERTH_CONTROLLER_BACKUP_SNAPSHOT_SECONDS", "3")
    monkeypatch.setenv("BERTH_CONTROLLER_BACKUP_PRUNE_SECONDS", "3")
    monkeypatch.setenv("BERTH_CONTROLLER_BACKUP_POLICY", "1h min=2")
    with btrfs_filesystems() as make:
        mnt = make("1G")
        apps = new_apps_dir(berth_root)
        platform = start_platform(mnt / "p", venv_cache, apps, jobs=True)
        try:
            admin = Berth(platform, tmp_path / "cli-admin")
            berth = Berth(platform, tmp_path / "cli")
            berth.env["BERTH_CLI_TOKEN"] = \
                (platform.data_dir / "controller" / "backup-admin.token").read_text().strip()
            admin("apps", "create", "beat")
            out = admin("addons", "create", "postgres", "--plan", "dedicated", "-a", "beat",
                        timeout=120).stdout
            addon = out.strip().splitlines()[-1]
            volume = f"addon-{addon}"
            url = admin("config", "get", "DATABASE_URL", "-a", "beat").stdout.strip()
            with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
                conn.autocommit = True
                cur.execute("CREATE TABLE t (id int)")
                cur.execute("INSERT INTO t SELECT generate_series(1, 500)")

            def snapshots() -> list[str]:
                return [s["name"] for s in berth.json("backup", "show", volume)["snapshots"]]
            admin.wait_for(lambda: len(snapshots()) >= 3, 60, "three beat snapshots")
            root = Path(berth.json("backup", "show", volume)["path"])
            assert btrfs.is_subvolume(root), "a worker adopted the supervised server's root"
            log = (platform.data_dir / "logs" / "controller.log").read_text()
            assert "unserving addon server" in log and "addon servers resumed" in log

            def serving() -> bool:
                servers = admin.json("addons", "info", addon)["servers"]
                return len(servers) == 2 and all(State(s["state"]) is State.RUNNING
                                                 for s in servers)
            admin.wait_for(serving, 30, "the runner serving the adopted server")
            with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM t")
                assert cur.fetchone()[0] == 500

            # prune by "1h min=2": within one hour the first of it and the newest stay
            # (the first of the hour is kept, so a run across an hour boundary keeps 3)
            def pruned() -> bool:
                names = snapshots()
                return 2 <= len(names) <= 3
            admin.wait_for(pruned, 30, "beat pruning to the policy")
            print(f"\nbeat: {len(snapshots())} snapshots of {volume} kept; "
                  f"{os.environ['BERTH_CONTROLLER_BACKUP_POLICY']}")
        finally:
            platform.stop()
            forget_apps(apps)
            time.sleep(0.2)
