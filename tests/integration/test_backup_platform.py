"""Backups through the platform's path, on a loop-mounted btrfs (root only): a
dedicated PostgreSQL provisioned by dbprovision under its addons_dir, an app's data
dir under a runner apps_dir; the beat task snapshots both (the server's root adopted
as a subvolume once), a restore by time puts them back, the policy prunes.

Acceptance 1 of issue 10: every row committed before the snapshot is in the restored
cluster, which starts cleanly; the same for an app's data dir."""
from __future__ import annotations

import threading
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import psycopg2
import pytest

from backup import btrfs, manifest
from controller import backupjobs, jobs
from controller.backups import BackupBusy, Catalog
from controller.settings import SPEC
from dbprovision.service import Provisioner
from tests.integration.test_backup_btrfs import make_btrfs, pytestmark  # noqa: F401

assert pytestmark


def _settings(addons: Path, apps: Path) -> SimpleNamespace:
    s = SPEC.load(None)
    s.addons_dir, s.backup_apps_dirs, s.broker_url = str(addons), [str(apps)], ""
    s.backup_policy = "2h min=1"
    return s


@pytest.fixture
def platform(make_btrfs):  # noqa: F811 - the fixture imported above
    mnt = make_btrfs("1G")
    addons, apps = mnt / "addons", mnt / "runner" / "apps"
    prov = Provisioner(addons, "127.0.0.1")
    (apps / "blog" / "data").mkdir(parents=True)
    s = _settings(addons, apps)
    saved = jobs._settings, jobs._provisioner
    jobs.configure(s)
    jobs._provisioner = prov
    try:
        yield prov, s, mnt
    finally:
        jobs._settings, jobs._provisioner = saved
        prov.stop_all()


def test_beat_schedule_has_the_backup_jobs(monkeypatch, tmp_path):
    s = SPEC.load(None)
    s.broker_url, s.addons_dir = "redis://127.0.0.1:1/0", str(tmp_path / "addons")
    monkeypatch.setattr(SPEC, "load", lambda path=None: s)
    monkeypatch.setattr(jobs.app, "start", lambda argv: None)   # beat itself not run
    monkeypatch.setattr(jobs.logging, "basicConfig", lambda **kw: None)
    jobs.main(["beat"])             # what `python -m controller.jobs beat` does first
    sched = jobs.app.conf.beat_schedule
    assert sched["backup-snapshots"]["task"] == backupjobs.SNAPSHOT_ALL
    assert sched["backup-prune"]["schedule"] == s.backup_prune_seconds
    assert backupjobs.SNAPSHOT_ALL in jobs.app.tasks


def test_dedicated_postgres_and_app_data_snapshot_restore_through_the_platform(platform):
    prov, s, mnt = platform
    creds = prov.provision("pgd1", "postgres", "dedicated")
    direct = creds.env["DATABASE_DIRECT_URL"]
    with closing(psycopg2.connect(direct)) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("CREATE TABLE t (id bigint PRIMARY KEY, pad text)")
    data = Path(s.backup_apps_dirs[0]) / "blog" / "data"
    (data / "notes.txt").write_text("before")

    catalog = backupjobs.catalog()
    assert {pv.name: pv.kind for pv in catalog.volumes()} == \
        {"app-blog": "app-data", "addon-pgd1": "postgres"}

    # a bounded write load through the tenant's own URL while the beat task runs
    stop, committed, errors = threading.Event(), [0], []

    def writer() -> None:
        try:
            with closing(psycopg2.connect(direct)) as conn, conn.cursor() as cur:
                conn.autocommit = True
                i = 0
                while not stop.is_set() and i < 100_000:
                    i += 1
                    cur.execute("INSERT INTO t VALUES (%s, repeat('x', 100))", (i,))
                    committed[0] = i
        except psycopg2.Error as exc:   # the adoption's one stop ends this connection
            errors.append(str(exc))

    # the first snapshot adopts the server's root (a stop of about a second): take it
    # before the load, as the platform's first beat run would
    first = backupjobs.snapshot_all()
    pg_root = catalog.volume("addon-pgd1").path
    assert btrfs.is_subvolume(pg_root), "the dedicated server's root was adopted"
    assert set(first) == {"app-blog", "addon-pgd1"}
    assert all("@" in v for v in first.values()), first

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.5)
    before = committed[0]
    time.sleep(1.0)                 # snapshot names are to the second
    started = time.monotonic()
    second = backupjobs.snapshot_all()
    took = time.monotonic() - started
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=10)
    after = committed[0]
    assert not errors, errors
    assert 0 < before < after
    snap_name = second["addon-pgd1"]
    snap = catalog.snapshots(catalog.volume("addon-pgd1")).list("addon-pgd1")[-1]
    assert snap.name == snap_name and btrfs.is_readonly(snap.path)
    assert manifest.manifest_path(snap.path).exists()
    shown = catalog.describe(catalog.volume("addon-pgd1"))
    assert shown["snapshotter"] == "btrfs" and len(shown["snapshots"]) == 2
    blog = catalog.describe(catalog.volume("app-blog"))
    assert blog["snapshotter"] == "rsync-link-dest" and blog["notes"]

    # verify: checksums, then PostgreSQL started on a scratch clone
    checked = catalog.verify("addon-pgd1", snap.time)
    assert checked["files"] > 100 and "pgd1" in " ".join(checked["databases"])

    # what the offsite host holds of it, checked there: received, re-hashed, started
    from backup import offsite
    away = mnt / "offsite"
    away.mkdir(mode=0o700)
    btrfs.send_receive(snap.path, away)
    (away / manifest.manifest_path(snap.path).name).write_bytes(
        manifest.manifest_path(snap.path).read_bytes())
    held = offsite.check_copy(away, "addon-pgd1")
    assert held.copy.name == snap.name and held.files == checked["files"]
    assert held.databases == checked["databases"]
    assert [p.name for p in mnt.iterdir() if p.name.startswith(".berth-check")] == []

    # one job per volume
    with catalog.busy(catalog.volume("addon-pgd1")), pytest.raises(BackupBusy):
        catalog.snapshot("addon-pgd1")

    # restore in place "as of" the snapshot's second: rows committed before it are all
    # there, no gaps, the server starts (through PgBouncer too)
    steps: list[str] = []
    done = catalog.restore("addon-pgd1", snap.time + timedelta(milliseconds=999),
                           progress=steps.append)
    assert done.kept is not None and done.kept.name.startswith("addon-pgd1@")
    assert steps[0] == f"chosen {snap.name}" and "starting the consumers" in steps
    with closing(psycopg2.connect(creds.url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), max(id), count(*) FILTER (WHERE id <= %s) FROM t",
                    (before,))
        count, top, old = cur.fetchone()
    assert old == before, "every row committed before the snapshot is there"
    assert count == top and before <= top <= after
    print(f"\nplatform snapshot_all under writes: {took * 1000:.0f} ms for 2 volumes; "
          f"{before} rows before, {top} in the restore, {after} at the end")

    # the app's data dir: restored in place with its consumers stopped and started
    (data / "notes.txt").write_text("after")
    calls: list[str] = []
    app_snap = catalog.snapshots(catalog.volume("app-blog")).list("app-blog")[-1]
    catalog.restore("app-blog", app_snap.time, stop=lambda: calls.append("stop"),
                    start=lambda: calls.append("start"))
    assert calls == ["stop", "start"]
    assert (data / "notes.txt").read_text() == "before"

    # into a new volume, the original untouched
    into = catalog.restore("app-blog", app_snap.time, into="blog-copy")
    assert (into.volume.path / "notes.txt").read_text() == "before"

    # retention "2h min=1" across injected times: a dry run names, a run deletes
    cat2 = Catalog.from_settings(s, lambda: prov)
    cat2.clock = lambda: snap.time + timedelta(hours=5)
    names = [x.name for x in cat2.snapshots(cat2.volume("app-blog")).list("app-blog")]
    dry = backupjobs.prune_all(dry_run=True)
    assert set(dry["app-blog"]) <= set(names)
    assert [x.name for x in cat2.snapshots(cat2.volume("app-blog")).list("app-blog")] == \
        names, "a dry run deletes nothing"
    decisions = cat2.prune("app-blog", dry_run=True)
    assert [k for _, k, _ in decisions] == [False] * (len(names) - 1) + [True]
    assert decisions[-1][2] == "kept: newest"
    cat2.prune("app-blog")
    left = cat2.snapshots(cat2.volume("app-blog")).list("app-blog")
    assert [x.name for x in left] == names[-1:]
    gone = left[0].path.with_name(names[0])
    assert not gone.exists() and not manifest.manifest_path(gone).exists()


def test_shared_servers_and_one_tenant_through_the_platform(platform):
    """The shared servers are volumes too (every tenant at one instant, restored only
    into a new volume); a shared-PostgreSQL tenant has its own dump volume, and
    restoring it leaves the other tenant's changes (acceptance 4, through the platform)."""
    from backup.errors import BackupError
    prov, _, _ = platform
    one = prov.provision("pgs1", "postgres", "shared")
    two = prov.provision("pgs2", "postgres", "shared")
    prov.provision("rds1", "redis", "shared")
    for creds, rows in ((one, "a"), (two, "x")):
        with closing(psycopg2.connect(creds.url)) as conn, conn.cursor() as cur:
            conn.autocommit = True
            cur.execute("CREATE TABLE notes (body text)")
            cur.execute("INSERT INTO notes VALUES (%s)", (rows,))
    catalog = backupjobs.catalog()
    kinds = {pv.name: pv.kind for pv in catalog.volumes()}
    assert kinds["addon-pgs1"] == kinds["addon-pgs2"] == "postgres-tenant"
    assert kinds["postgres-shared"] == "postgres-shared"
    assert kinds["redis-shared"] == "redis-shared"

    taken = backupjobs.snapshot_all()
    assert all("@" in v for v in taken.values()), taken
    for name in ("postgres-shared", "redis-shared"):
        assert btrfs.is_subvolume(catalog.volume(name).path), f"{name} adopted"
    snap = catalog.snapshots(catalog.volume("addon-pgs1")).list("addon-pgs1")[-1]
    tenant = next(r for r in prov.records.all() if r.addon_id == "pgs1")
    assert [p.name for p in snap.path.iterdir()] == [f"{tenant.name}.dump"]
    redis_snap = catalog.snapshots(catalog.volume("redis-shared")).list("redis-shared")[-1]
    assert (redis_snap.path / "appendonly").is_dir()

    for creds, rows in ((one, "b"), (two, "y")):
        with closing(psycopg2.connect(creds.url)) as conn, conn.cursor() as cur:
            conn.autocommit = True
            cur.execute("INSERT INTO notes VALUES (%s)", (rows,))
    catalog.restore("addon-pgs1", snap.time)
    for creds, expected in ((one, ["a"]), (two, ["x", "y"])):
        with closing(psycopg2.connect(creds.url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT body FROM notes ORDER BY body")
            assert [r[0] for r in cur.fetchall()] == expected

    with pytest.raises(BackupError) as refused:
        catalog.restore("postgres-shared")
    assert refused.value.status == 409 and "--into" in refused.value.hint
    checked = catalog.verify("postgres-shared")
    assert {r.name for r in prov.records.all() if r.engine == "postgres"} <= \
        set(checked["databases"])
    into = catalog.restore("postgres-shared", into="pgshared-copy")
    assert (into.volume.path / "data" / "PG_VERSION").exists()
