"""Backups on real btrfs: loop-mounted filesystems made here (root only), snapshots,
incremental send/receive to a second filesystem (the offsite host's own), manifests,
retention, and a PostgreSQL cluster snapshotted after CHECKPOINT under a write load,
then started from the copy and queried.

Each filesystem is a file in /var/tmp, mkfs.btrfs'd, attached with `losetup -f --show`
and mounted under /var/tmp; teardown unmounts that mount point and detaches that loop
device (the exact ones made), then removes the files."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup import btrfs, manifest
from backup.errors import TransferFailed
from backup.pgverify import verify_postgres
from backup.retention import Policy
from backup.snapshots import PostgresCheckpoint, Snapshots
from backup.volumes import VolumeStore
from dbprovision.command import run
from dbprovision.pgcluster import PgCluster
from dbprovision.ports import free_port

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounting a btrfs needs root"),
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None,
                       reason="btrfs-progs is not installed (scripts/setup.sh installs it)"),
    pytest.mark.timeout(300),
]

log = logging.getLogger(__name__)
FIGURES: list[str] = []


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.fixture
def make_btrfs() -> Iterator[Callable[[str], Path]]:
    with btrfs_filesystems() as make:
        yield make


@contextmanager
def btrfs_filesystems() -> Iterator[Callable[[str], Path]]:
    """make(size) -> the mount point of a new loop-mounted btrfs; all removed after."""
    made: list[tuple[Path, str, Path]] = []      # (work dir, loop device, mount point)

    def make(size: str = "512M") -> Path:
        work = Path(tempfile.mkdtemp(prefix="berth-btrfs-", dir="/var/tmp"))
        work.chmod(0o711)              # the postgres user passes through to its volume
        image, mnt = work / "fs.img", work / "mnt"
        run(["truncate", "-s", size, image], timeout=10)
        run(["mkfs.btrfs", "-q", image], timeout=60)
        device = run(["losetup", "-f", "--show", image], timeout=10).stdout.strip()
        made.append((work, device, mnt))
        mnt.mkdir()
        run(["mount", device, mnt], timeout=30)
        mnt.chmod(0o711)
        return mnt

    try:
        yield make
    finally:
        for work, device, mnt in reversed(made):
            if _mounted(mnt):
                run(["umount", mnt], timeout=60)
            run(["losetup", "-d", device], timeout=10, check=False)
            shutil.rmtree(work, ignore_errors=True)


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_snapshot_change_send_incremental_verify_and_prune(make_btrfs):
    served, offsite = make_btrfs("512M"), make_btrfs("512M")
    assert btrfs.is_btrfs(served) and not btrfs.is_btrfs(Path("/var/tmp"))
    store = VolumeStore(served / "berth")
    assert store.snapshotter.kind == "btrfs"
    assert "atomic" in store.describe()
    vol = store.create("app1-data")
    assert btrfs.is_subvolume(vol.path)
    (vol.path / "uploads").mkdir()
    write_random(vol.path / "uploads" / "big.bin", 64 << 20)
    (vol.path / "db.sqlite").write_text("v1")

    t0 = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)
    snaps = Snapshots(store)
    started = time.monotonic()
    s1 = snaps.take(vol, now=t0)
    snap_seconds = time.monotonic() - started
    assert s1.name == "app1-data@20261130T200000Z"
    assert btrfs.is_readonly(s1.path)
    with pytest.raises(OSError):
        (s1.path / "db.sqlite").write_text("changed")

    (vol.path / "db.sqlite").write_text("v2")
    with open(vol.path / "uploads" / "big.bin", "r+b") as f:
        f.seek(10 << 20)
        f.write(os.urandom(1 << 20))
    write_random(vol.path / "uploads" / "new.bin", 512 << 10)
    s2 = snaps.take(vol, now=t0 + timedelta(minutes=30))
    assert [s.name for s in snaps.list("app1-data")] == [s1.name, s2.name]
    assert tree(s1.path)["db.sqlite"] == b"v1" and tree(s2.path)["db.sqlite"] == b"v2"

    # offsite: its own filesystem; full, then incremental against the copy it holds
    copies = offsite / "copies"
    copies.mkdir()
    full = btrfs.send_receive(s1.path, copies)
    inc = btrfs.send_receive(s2.path, copies, parent=s1.path)
    for t in (full, inc):
        assert btrfs.is_readonly(t.received)
        manifest.write(t.received)
        assert manifest.verify(t.received) >= 1
        assert manifest.is_complete(t.received)
    assert tree(inc.received) == tree(s2.path)
    assert full.bytes > 64 << 20
    assert inc.bytes < 4 << 20, "the incremental stream carries only what changed"
    FIGURES.append(f"snapshot of a 64 MB volume: {snap_seconds * 1000:.1f} ms; "
                   f"full send {full.bytes / 1e6:.1f} MB in {full.seconds:.2f} s; "
                   f"incremental send {inc.bytes / 1e6:.2f} MB in {inc.seconds:.2f} s")

    # an incremental whose parent the receiving filesystem lacks (receive finds the
    # parent by UUID anywhere on its filesystem) fails and leaves no partial copy
    stray = make_btrfs("256M")
    with pytest.raises(TransferFailed) as err:
        btrfs.send_receive(s2.path, stray, parent=s1.path)
    assert "receive" in err.value.message and err.value.hint
    assert list(stray.iterdir()) == []

    # retention over injected times: two more, then keep 1h (first of the hour) + newest
    s3 = snaps.take(vol, now=t0 + timedelta(hours=1))
    s4 = snaps.take(vol, now=t0 + timedelta(hours=1, minutes=20))
    now = t0 + timedelta(hours=1, minutes=30)
    policy = Policy.parse("1h")
    dry = snaps.prune("app1-data", policy, now=now, dry_run=True)
    assert [(s.name, keep) for s, keep, _ in dry] == \
        [(s1.name, False), (s2.name, False), (s3.name, True), (s4.name, True)]
    assert dry[2][2] == "kept: first of hour 2026-11-30T21"
    assert dry[3][2] == "kept: newest"
    assert len(snaps.list("app1-data")) == 4          # a dry run deletes nothing
    snaps.prune("app1-data", policy, now=now)
    assert [s.name for s in snaps.list("app1-data")] == [s3.name, s4.name]
    assert not s1.path.exists()
    print("\n" + "\n".join(FIGURES))


def test_postgres_snapshot_under_writes_starts_from_the_copy(make_btrfs, tmp_path):
    served = make_btrfs("1G")
    store = VolumeStore(served / "berth")
    vol = store.create("pg1")
    cluster = PgCluster(vol.path, "127.0.0.1", free_port("127.0.0.1"))
    cluster.init()
    cluster.start()
    stop = threading.Event()
    committed = [0]
    try:
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id bigint PRIMARY KEY, pad text)")

        def writer() -> None:
            with closing(cluster.connect()) as conn, conn.cursor() as cur:
                i = 0
                while not stop.is_set() and i < 200_000:    # bounded
                    i += 1
                    cur.execute("INSERT INTO t VALUES (%s, repeat('x', 200))", (i,))
                    committed[0] = i                         # autocommit: committed

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.5)
        before = committed[0]
        started = time.monotonic()
        snap = Snapshots(store).take(vol, hooks=[PostgresCheckpoint(cluster.connect)])
        took = time.monotonic() - started
        time.sleep(0.2)
        stop.set()
        thread.join(timeout=10)
        after = committed[0]
    finally:
        stop.set()
        cluster.stop()
    assert before > 0 and after > before

    scratch = served / "scratch"
    result = verify_postgres(snap.path, scratch, free_port("127.0.0.1"),
                             "SELECT count(*), max(id), "
                             f"count(*) FILTER (WHERE id <= {before}) FROM t")
    assert btrfs.is_subvolume(scratch), "the scratch copy is a writable btrfs clone"
    btrfs.delete_subvolume(scratch)
    count, top, old = result.rows[0]
    assert old == before, "every row committed before the snapshot is in the copy"
    assert count == top, "no gaps: the copy is one consistent instant"
    assert before <= top <= after
    print(f"\npostgres: CHECKPOINT + snapshot {took * 1000:.0f} ms under writes "
          f"({before} rows before, {top} in the copy, {after} at the end); scratch "
          f"clone {result.copy_seconds * 1000:.0f} ms, start with recovery "
          f"{result.start_seconds:.2f} s")


def test_restore_in_place_keeps_the_replaced_data_and_into_a_new_volume(make_btrfs):
    from backup.restore import NoSnapshot, as_of, restore_in_place, restore_into
    served = make_btrfs("512M")
    snaps = Snapshots(VolumeStore(served / "berth"))
    vol = snaps.store.create("app5-data")
    (vol.path / "f.txt").write_text("at 20:00")
    s1 = snaps.take(vol, now=datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    (vol.path / "f.txt").write_text("at 21:00")
    (vol.path / "later.txt").write_text("x")
    s2 = snaps.take(vol, now=datetime(2026, 11, 30, 21, 0, tzinfo=UTC))
    (vol.path / "f.txt").write_text("live")

    chosen = as_of(snaps.list("app5-data"), datetime(2026, 11, 30, 20, 59, tzinfo=UTC))
    assert chosen.name == s1.name
    with pytest.raises(NoSnapshot):
        as_of(snaps.list("app5-data"), datetime(2026, 11, 30, 19, 0, tzinfo=UTC))

    calls: list[str] = []
    done = restore_in_place(snaps, vol, chosen.path, stop=lambda: calls.append("stop"),
                            start=lambda: calls.append("start"),
                            now=datetime(2026, 11, 30, 22, 0, tzinfo=UTC))
    assert calls == ["stop", "start"]
    assert tree(vol.path) == {"f.txt": b"at 20:00"}
    assert btrfs.is_subvolume(vol.path) and not btrfs.is_readonly(vol.path)
    assert done.kept is not None and btrfs.is_readonly(done.kept.path)
    assert tree(done.kept.path)["f.txt"] == b"live"
    assert [p.name for p in (served / "berth" / "volumes").iterdir()] == ["app5-data"]

    new = restore_into(snaps, s2.path, "app5-data-at-21")
    assert tree(new.volume.path) == {"f.txt": b"at 21:00", "later.txt": b"x"}
    assert tree(vol.path) == {"f.txt": b"at 20:00"}


def test_postgres_restored_in_place_has_exactly_the_rows_before_the_snapshot(make_btrfs):
    from backup.pgverify import drop_stale_locks
    from backup.restore import restore_in_place
    served = make_btrfs("1G")
    snaps = Snapshots(VolumeStore(served / "berth"))
    vol = snaps.store.create("pg2")
    cluster = PgCluster(vol.path, "127.0.0.1", free_port("127.0.0.1"))
    cluster.init()
    cluster.start()
    try:
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
            cur.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        snap = snaps.take(vol, hooks=[PostgresCheckpoint(cluster.connect)])
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO t SELECT generate_series(1001, 2000)")
        restore_in_place(snaps, vol, snap.path, stop=cluster.stop, start=cluster.start,
                         fixup=drop_stale_locks,
                         now=snap.time + timedelta(minutes=5))
        cluster.wait_ready()
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*), max(id) FROM t")
            assert cur.fetchone() == (1000, 1000)
    finally:
        cluster.stop()


def test_offsite_pull_through_the_forced_command(make_btrfs):
    """The btrfs flavour of the pull: the offsite host asks the served host's forced
    command (backup/forced.py; over ssh in production, here the same program with
    SSH_ORIGINAL_COMMAND set) and receives on its own filesystem."""
    import shlex
    import subprocess
    import sys

    from backup import offsite
    served, away = make_btrfs("512M"), make_btrfs("512M")
    snaps = Snapshots(VolumeStore(served / "berth"))
    vol = snaps.store.create("app7-data")
    write_random(vol.path / "big.bin", 16 << 20)
    (vol.path / "f.txt").write_text("one")
    s1 = snaps.take(vol, now=datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    manifest.write(s1.path)

    def remote(request: list[str]) -> list[str]:
        return ["env", f"SSH_ORIGINAL_COMMAND={shlex.join(request)}", sys.executable,
                "-m", "backup.forced", str(snaps.store.snapshots_dir)]

    copies = away / "copies"
    copies.mkdir(mode=0o700)
    first = offsite.pull_btrfs(remote, copies)
    (vol.path / "f.txt").write_text("two")
    s2 = snaps.take(vol, now=datetime(2026, 11, 30, 21, 0, tzinfo=UTC))
    manifest.write(s2.path)
    second = offsite.pull_btrfs(remote, copies)
    assert [p.name for p in first + second] == [s1.name, s2.name]
    assert second[0].previous == copies / s1.name
    assert first[0].bytes_received > 16 << 20 and second[0].bytes_received < 64 << 10
    assert all(manifest.is_complete(p.copy) and btrfs.is_readonly(p.copy)
               for p in first + second)
    assert (copies / s2.name / "f.txt").read_text() == "two"
    # the second copy's unchanged file is the first's blocks (verified then, not
    # hashed again); a changed one is not
    big2 = copies / s2.name / "big.bin"
    assert manifest.same_blocks(copies / s1.name / "big.bin", big2, big2.lstat())
    (vol.path / "big.bin").write_bytes(os.urandom(16 << 20))
    s3 = snaps.take(vol, now=datetime(2026, 11, 30, 22, 0, tzinfo=UTC))
    manifest.write(s3.path)
    third = offsite.pull_btrfs(remote, copies)
    big3 = copies / s3.name / "big.bin"
    assert not manifest.same_blocks(big2, big3, big3.lstat())
    assert third[0].bytes_received > 16 << 20 and manifest.is_complete(third[0].copy)
    assert offsite.pull_btrfs(remote, copies) == []
    print(f"\noffsite pull (btrfs, forced command): first {first[0].bytes_received / 1e6:.1f}"
          f" MB in {first[0].seconds:.2f} s, second {second[0].bytes_received / 1e3:.1f} kB "
          f"in {second[0].seconds:.2f} s")

    # the forced command does nothing else
    for bad in (["delete", s1.name], ["send", "../" + s1.name], ["send", s1.name, "x@y"],
                ["sh", "-c", "rm -rf /"], ["list;", "rm"], []):
        done = subprocess.run(remote(bad), capture_output=True, timeout=30)
        assert done.returncode == 2 and b"refused" in done.stderr, bad
    assert {s.name for s in snaps.list()} == {s1.name, s2.name, s3.name}


def test_a_transfer_cut_short_leaves_no_copy(make_btrfs):
    """A stream that ends early or is garbage (a dropped connection, a lying peer):
    receive fails, the error says so, and no partial subvolume remains."""
    away = make_btrfs("256M")
    for producer in (["head", "-c", "100000", "/dev/urandom"], ["false"]):
        with pytest.raises(TransferFailed) as err:
            btrfs.receive_from(producer, away, "app8-data@20261130T200000Z", timeout=30)
        assert err.value.hint
        assert list(away.iterdir()) == []
