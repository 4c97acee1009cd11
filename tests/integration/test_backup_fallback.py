"""Backups off btrfs: the rsync --link-dest snapshotter on /var/tmp (ext4 here), whose
unchanged files share inodes between snapshots; and the pre-snapshot hooks against
real servers: Redis BGREWRITEAOF (its volume is the server's own directory) and a
shared-PostgreSQL tenant's pg_dump into its volume."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup import btrfs, manifest
from backup.errors import HookFailed
from backup.restore import restore_tenant_dump
from backup.retention import Policy
from backup.snapshots import PgDump, RedisAofRewrite, Snapshots
from backup.volumes import LinkDestSnapshotter, VolumeStore
from dbprovision.pgcluster import PG_BIN, PgCluster
from dbprovision.ports import free_port
from dbprovision.redisserver import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None,
                                reason="rsync is not installed (scripts/setup.sh installs it)")

T0 = datetime(2026, 11, 30, 22, 15, tzinfo=UTC)


@pytest.fixture
def plain_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="berth-backup-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_link_dest_fallback_shares_unchanged_files(plain_root):
    assert not btrfs.is_btrfs(plain_root)
    store = VolumeStore(plain_root / "store")
    assert store.snapshotter.kind == "rsync-link-dest"
    said = store.describe()
    assert "not on btrfs" in said and "atomic" in said and "torn" in said
    assert "by content" in said and "tick" in LinkDestSnapshotter(checksum=False).describe()
    vol = store.create("app2-data")
    (vol.path / "media").mkdir()
    (vol.path / "media" / "same.bin").write_bytes(os.urandom(1 << 20))
    (vol.path / "notes.txt").write_text("v1")
    snaps = Snapshots(store)
    started = time.monotonic()
    s1 = snaps.take(vol, now=T0)
    first = time.monotonic() - started
    (vol.path / "notes.txt").write_text("v2 longer")
    started = time.monotonic()
    s2 = snaps.take(vol, now=T0 + timedelta(hours=1))
    second = time.monotonic() - started
    assert s2.name == "app2-data@20261130T231500Z"
    same1, same2 = (s / "media" / "same.bin" for s in (s1.path, s2.path))
    assert same1.stat().st_ino == same2.stat().st_ino, "unchanged: one inode, linked"
    assert (s1.path / "notes.txt").stat().st_ino != (s2.path / "notes.txt").stat().st_ino
    assert (s1.path / "notes.txt").read_text() == "v1"
    assert (s2.path / "notes.txt").read_text() == "v2 longer"
    assert not any(p.name.endswith(".partial") for p in store.snapshots_dir.iterdir())
    for s in (s1, s2):
        manifest.write(s.path)
        manifest.verify(s.path)
        assert manifest.is_complete(s.path)
    decisions = snaps.prune("app2-data", Policy.parse("1h"), now=T0 + timedelta(hours=1))
    assert [keep for _, keep, _ in decisions] == [False, True]
    assert [s.name for s in snaps.list()] == [s2.name]
    assert same2.stat().st_nlink == 1, "the pruned snapshot's link is gone, the file stays"
    print(f"\nlink-dest fallback: first snapshot {first * 1000:.0f} ms, "
          f"second (1 of 2 files changed) {second * 1000:.0f} ms")


def test_redis_bgrewriteaof_then_snapshot(plain_root):
    store = VolumeStore(plain_root / "store")
    vol = store.volume("redis1")
    server = RedisServer(vol.path, "127.0.0.1", free_port("127.0.0.1"))
    server.configure()
    server.start()
    try:
        client = server.admin()
        for i in range(2000):
            client.set(f"k{i}", "v" * 100)
        snap = Snapshots(store).take(vol, hooks=[RedisAofRewrite(client, timeout=30)], now=T0)
        assert client.info("persistence")["aof_rewrite_in_progress"] == 0
    finally:
        server.stop()
    aof = snap.path / "appendonly"
    assert aof.is_dir() and any(p.name.endswith(".base.rdb") or p.name.endswith(".base.aof")
                                for p in aof.iterdir())
    # a server that is gone: the hook fails, and no snapshot is taken
    with pytest.raises(HookFailed) as err:
        Snapshots(store).take(vol, hooks=[RedisAofRewrite(client, timeout=2)],
                              now=T0 + timedelta(hours=1))
    assert err.value.hint
    assert [s.name for s in Snapshots(store).list("redis1")] == [snap.name]


def test_shared_postgres_tenant_gets_its_own_dump(plain_root):
    cluster = PgCluster(plain_root / "pg", "127.0.0.1", free_port("127.0.0.1"))
    cluster.init()
    cluster.start()
    store = VolumeStore(plain_root / "store")
    try:
        for db in ("tenant_a", "tenant_b"):
            with closing(cluster.connect()) as conn, conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {db}")
            with closing(cluster.connect(db)) as conn, conn.cursor() as cur:
                cur.execute(f"CREATE TABLE only_{db} (x int); INSERT INTO only_{db} VALUES (1)")
        vol = store.create("tenant_a-db")
        snap = Snapshots(store).take(vol, hooks=[PgDump(cluster, "tenant_a")], now=T0)
        with pytest.raises(HookFailed):
            Snapshots(store).take(vol, hooks=[PgDump(cluster, "no_such_db")],
                                  now=T0 + timedelta(hours=1))
        # both tenants change; restoring tenant_a leaves tenant_b's change alone
        for db in ("tenant_a", "tenant_b"):
            with closing(cluster.connect(db)) as conn, conn.cursor() as cur:
                cur.execute(f"INSERT INTO only_{db} VALUES (2); CREATE TABLE extra (y int)")
        restore_tenant_dump(cluster, "tenant_a", snap.path / "tenant_a.dump")
        with closing(cluster.connect("tenant_a")) as conn, conn.cursor() as cur:
            cur.execute("SELECT array_agg(x ORDER BY x) FROM only_tenant_a")
            assert cur.fetchone() == ([1],)
            # --clean drops what the dump holds; a table made after it stays (said in
            # restore_tenant_dump's docstring: a whole-database swap is left)
            cur.execute("SELECT to_regclass('extra') IS NOT NULL")
            assert cur.fetchone() == (True,)
        with closing(cluster.connect("tenant_b")) as conn, conn.cursor() as cur:
            cur.execute("SELECT array_agg(x ORDER BY x) FROM only_tenant_b")
            assert cur.fetchone() == ([1, 2],)
            cur.execute("SELECT to_regclass('extra') IS NOT NULL")
            assert cur.fetchone() == (True,)
    finally:
        cluster.stop()
    dump = snap.path / "tenant_a.dump"
    assert sorted(p.name for p in snap.path.iterdir()) == ["tenant_a.dump"]
    listing = subprocess.run([str(PG_BIN / "pg_restore"), "-l", str(dump)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert "only_tenant_a" in listing and "only_tenant_b" not in listing


def test_restore_in_place_off_btrfs(plain_root):
    from backup.restore import restore_in_place
    snaps = Snapshots(VolumeStore(plain_root / "store"))
    vol = snaps.store.create("app6-data")
    (vol.path / "f.txt").write_text("old")
    s1 = snaps.take(vol, now=T0)
    (vol.path / "f.txt").write_text("new")     # same size, same tick: --checksum sees it
    done = restore_in_place(snaps, vol, s1.path, now=T0 + timedelta(hours=1))
    assert (vol.path / "f.txt").read_text() == "old"
    assert done.kept is not None and (done.kept.path / "f.txt").read_text() == "new"
    (vol.path / "f.txt").write_text("writable again")
    assert (s1.path / "f.txt").read_text() == "old", "the restore copied, not linked"
    assert sorted(p.name for p in snaps.store.volumes_dir.iterdir()) == ["app6-data"]
