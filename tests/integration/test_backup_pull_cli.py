"""`berth backup pull` as the simulated offsite host's own user (berth-offsite, made by
scripts/setup.sh), from a served host's read-only rsync module: the first pull
copies and verifies, the second moves only the change and links the rest, and the
served host's side (the platform's root-run module, an app user such as `nobody`)
can neither list nor change the copies. Root on this one machine could; real hosts
are separate, and the served hosts hold no credential for the offsite host."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from backup import manifest, offsite
from backup.snapshots import Snapshots
from backup.volumes import LinkDestSnapshotter, VolumeStore
from tests.integration.test_backup_offsite import T0

OFFSITE_ADDRESS = "127.0.0.9"          # the offsite host's own address

ROOT = Path(__file__).resolve().parents[2]
OFFSITE_USER = "berth-offsite"


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to the offsite user needs root"),
    pytest.mark.skipif(_user(OFFSITE_USER) is None,
                       reason="no berth-offsite user: run scripts/setup.sh as root"),
]


@pytest.fixture
def served() -> Iterator[tuple[Snapshots, str, Path]]:
    """A served host's snapshots behind a read-only rsync module that allows only the
    offsite host's address (started here, stopped by its PID)."""
    root = Path(tempfile.mkdtemp(prefix="berth-served-", dir="/var/tmp"))
    root.chmod(0o711)
    store = VolumeStore(root / "served", LinkDestSnapshotter())
    try:
        with offsite.read_only_module(store.snapshots_dir, root,
                                      allow=OFFSITE_ADDRESS) as url:
            yield Snapshots(store), url, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                           "--clear-groups", "env", f"HOME={entry.pw_dir}",
                           f"PYTHONPATH={ROOT}", "NO_COLOR=1", "COLUMNS=200", *argv],
                          cwd="/", capture_output=True, text=True, timeout=120)


def test_offsite_user_pulls_twice_and_the_served_side_cannot_touch_the_copies(served):
    snaps, source, _ = served
    vol = snaps.store.create("app9-data")
    (vol.path / "big.bin").write_bytes(os.urandom(4 << 20))
    (vol.path / "small.txt").write_text("v1")
    s1 = snaps.take(vol, now=T0)
    manifest.write(s1.path)

    home = Path(tempfile.mkdtemp(prefix="berth-offsite-", dir="/var/tmp"))
    try:
        entry = pwd.getpwnam(OFFSITE_USER)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        home.chmod(0o700)
        copies = home / "copies"
        pull = [sys.executable, "-m", "cli.main", "backup", "pull", "--from", source,
                "--copies", str(copies), "--address", OFFSITE_ADDRESS]
        # the module serves the offsite host's address only
        elsewhere = as_user(OFFSITE_USER, *pull[:-2])
        assert elsewhere.returncode != 0 and "Error:" in elsewhere.stderr
        assert not copies.exists() or not any(copies.iterdir())
        first = as_user(OFFSITE_USER, *pull)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"{s1.name}: " in first.stdout and "verified" in first.stdout
        assert (copies / s1.name / "small.txt").stat().st_uid == entry.pw_uid

        (vol.path / "small.txt").write_text("v2")
        s2 = snaps.take(vol, now=T0 + timedelta(hours=1))
        manifest.write(s2.path)
        second = as_user(OFFSITE_USER, *pull)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"incremental on {s1.name}" in second.stdout
        moved = float(second.stdout.split(f"{s2.name}: ")[1].split(" MB")[0])
        assert moved < 0.1, f"only the change travels: {second.stdout}"
        assert (copies / s2.name / "big.bin").stat().st_ino == \
            (copies / s1.name / "big.bin").stat().st_ino, "unchanged files are links"
        assert manifest.is_complete(copies / s2.name)
        nothing = as_user(OFFSITE_USER, *pull)
        assert "Nothing new to pull" in nothing.stdout

        # the offsite host re-checks what it holds, by time, hashing everything again
        check = [sys.executable, "-m", "cli.main", "backup", "verify", "app9-data",
                 "--copies", str(copies)]
        older = as_user(OFFSITE_USER, *check, "--at", "2026-11-30T22:30:00Z")
        assert older.returncode == 0 and f"{s1.name}: 2 files match" in older.stdout, \
            older.stdout + older.stderr
        assert f"{s2.name}: 2 files match" in as_user(OFFSITE_USER, *check).stdout

        # the served side: an app's user cannot list, read, change or delete the copies
        for argv in (["ls", str(copies)], ["cat", str(copies / s2.name / "small.txt")],
                     ["rm", "-rf", str(copies / s1.name)],
                     ["touch", str(copies / "planted")]):
            tried = as_user("nobody", *argv)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, argv
        assert (copies / s1.name).exists() and not (copies / "planted").exists()
        # and the module the served host exposes is read-only: nothing goes up it
        up = subprocess.run(["rsync", f"--address={OFFSITE_ADDRESS}", "-a",
                             str(copies / s2.name / "small.txt"), f"{source}/planted"],
                            capture_output=True, text=True, timeout=30)
        assert up.returncode != 0 and "read only" in (up.stderr + up.stdout).lower()
    finally:
        shutil.rmtree(home, ignore_errors=True)
