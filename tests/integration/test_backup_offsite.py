"""The offsite pull over a read-only rsync module (an rsync daemon with `read only =
yes` on its own address stands in for ssh + a forced `rrsync -ro`): the second pull
moves only what changed, unchanged files are hard links to the previous copy, every
copy is verified against the served side's manifest, and nothing can write through
the module. On one machine root could of course reach everything; real hosts are
separate, and the served hosts hold no credential for the offsite host."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backup import manifest, offsite
from backup.errors import ManifestMismatch
from backup.snapshots import Snapshots
from backup.volumes import LinkDestSnapshotter, VolumeStore
from dbprovision.command import RunAs, run
from dbprovision.errors import CommandFailed

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None,
                                reason="rsync is not installed (scripts/setup.sh installs it)")

T0 = datetime(2026, 11, 30, 22, 0, tzinfo=UTC)


@pytest.fixture
def served() -> Iterator[tuple[Snapshots, str, Path]]:
    """A served host's store and a read-only rsync module of its snapshots, started
    here and stopped by its PID."""
    root = Path(tempfile.mkdtemp(prefix="berth-offsite-", dir="/var/tmp"))
    root.chmod(0o711)
    store = VolumeStore(root / "served", LinkDestSnapshotter())
    try:
        with offsite.read_only_module(store.snapshots_dir, root) as url:
            yield Snapshots(store), url, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_pull_twice_moves_only_changes_and_verifies(served):
    snaps, source, root = served
    vol = snaps.store.create("app3-data")
    (vol.path / "big.bin").write_bytes(os.urandom(8 << 20))
    (vol.path / "small.txt").write_text("v1")
    s1 = snaps.take(vol, now=T0)
    manifest.write(s1.path)
    copies = root / "offsite" / "copies"
    copies.mkdir(parents=True, mode=0o700)

    first = offsite.pull_new(source, copies)
    assert [p.name for p in first] == [s1.name]
    assert manifest.is_complete(copies / s1.name)

    (vol.path / "small.txt").write_text("v2")
    s2 = snaps.take(vol, now=T0 + timedelta(hours=1))
    # the same size and mtime as before (a rewrite within one timestamp tick): rsync's
    # quick check links the old file, the manifest catches it, a --checksum pass fixes it
    old = (s1.path / "small.txt").stat()
    os.utime(s2.path / "small.txt", ns=(old.st_atime_ns, old.st_mtime_ns))
    manifest.write(s2.path)
    second = offsite.pull_new(source, copies)
    assert [p.name for p in second] == [s2.name]
    assert second[0].previous == copies / s1.name
    assert first[0].bytes_received > 8 << 20
    assert second[0].bytes_received < 64 << 10, "only the changed file travelled"
    assert (copies / s1.name / "big.bin").stat().st_ino == \
        (copies / s2.name / "big.bin").stat().st_ino
    assert (copies / s2.name / "small.txt").read_text() == "v2"
    assert offsite.pull_new(source, copies) == []        # nothing new
    print(f"\noffsite pull (rsync): first {first[0].bytes_received / 1e6:.2f} MB in "
          f"{first[0].seconds:.2f} s, second {second[0].bytes_received / 1e3:.1f} kB in "
          f"{second[0].seconds:.2f} s")

    # nothing writes or deletes through the module
    intruder = root / "intruder.txt"
    intruder.write_text("x")
    with pytest.raises(CommandFailed) as err:
        run(["rsync", intruder, f"{source}/"], timeout=30)
    assert "read only" in err.value.message.lower() or "read-only" in err.value.message.lower()
    with pytest.raises(CommandFailed):
        run(["rsync", "-r", "--delete", f"{root / 'empty'}/", f"{source}/"], timeout=30)
    assert (snaps.store.snapshots_dir / s1.name).exists()

    # an app's or the platform's unprivileged user cannot list or touch the copies
    nobody = RunAs.lookup("nobody")
    for argv in (["ls", copies], ["touch", copies / "x"],
                 ["rm", "-rf", copies / s1.name]):
        assert run(argv, timeout=10, user=nobody, check=False).returncode != 0
    assert manifest.is_complete(copies / s1.name)


def test_a_copy_that_does_not_match_its_manifest_is_never_complete(served):
    snaps, source, root = served
    vol = snaps.store.create("app4-data")
    (vol.path / "a.txt").write_text("good")
    s1 = snaps.take(vol, now=T0)
    manifest.write(s1.path)
    copies = root / "copies"
    copies.mkdir(mode=0o700)
    offsite.pull_new(source, copies)
    (vol.path / "a.txt").write_text("changed")
    s2 = snaps.take(vol, now=T0 + timedelta(hours=1))
    manifest.write(s2.path)
    (s2.path / "a.txt").chmod(0o644)
    (s2.path / "a.txt").write_text("damaged after its manifest")   # bit rot, say
    with pytest.raises(ManifestMismatch):
        offsite.pull_new(source, copies)
    assert not manifest.is_complete(copies / s2.name)
    assert manifest.is_complete(copies / s1.name)                  # the good copy stays
    assert [p.name for p in offsite.complete_copies(copies)] == [s1.name]
