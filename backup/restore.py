"""Restore: choose a snapshot by time, then put it back in place or into a new volume.

In place: the consumers are stopped (callbacks the caller gives: the runner's app
instances, the dedicated server), the current data is kept as an ordinary read-only
snapshot (`<volume>@<now>`, so retention treats it like any other), the chosen copy
is made writable beside the volume (`.<name>.restoring`: a btrfs clone in constant
time, else `rsync -a`), and the two are swapped atomically (renameat2
RENAME_EXCHANGE: at every instant the volume's path holds one whole tree); then the
old tree is removed and the consumers started again, also when a step failed.

The source is a local snapshot or a complete offsite copy (an unverified copy is
refused).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dbprovision import command

from . import btrfs, manifest
from .errors import BackupError
from .snapshots import Snapshot, Snapshots, parse_name, snapshot_name
from .volumes import Volume

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2
AT_FDCWD = -100


class NoSnapshot(BackupError):
    """No snapshot at or before the time asked for."""

    code = "no_snapshot"
    status = 404
    default_hint = "`berth backup list` shows the snapshots and copies there are"


def as_of(snapshots: Sequence[Snapshot], when: datetime) -> Snapshot:
    """The newest snapshot taken at or before `when`."""
    before = [s for s in snapshots if s.time <= when]
    if not before:
        raise NoSnapshot(f"no snapshot at or before {when.astimezone(UTC):%Y-%m-%d %H:%M:%SZ}")
    return max(before, key=lambda s: s.time)


def exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE, Linux >= 3.15)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b),
                      RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise BackupError(f"could not swap {a} and {b}: {os.strerror(err)}",
                          "both must be on one filesystem" if err == errno.EXDEV else "")


def _copy_writable(source: Path, dest: Path) -> None:
    if btrfs.is_subvolume(source) and btrfs.is_btrfs(dest.parent):
        try:
            btrfs.clone_writable(source, dest)
            return
        except command.CommandFailed:
            pass        # another filesystem: copy
    if btrfs.is_btrfs(dest.parent):
        btrfs.create_subvolume(dest)
    command.run(["rsync", "-a", "-H", "--numeric-ids", f"{source}/", f"{dest}/"],
                timeout=3600)
    dest.chmod(source.stat().st_mode & 0o7777 | 0o200)


def _remove(path: Path) -> None:
    if btrfs.is_subvolume(path):
        btrfs.delete_subvolume(path)
    else:
        path.chmod(0o755)
        command.run(["rm", "-rf", "--one-file-system", path], timeout=3600)


def _check_source(source: Path) -> None:
    if manifest.manifest_path(source).exists() and not manifest.is_complete(source):
        raise BackupError(f"copy {source.name} is not verified complete",
                          "run verify on it first (backup.manifest.verify)")
    parse_name(source.name)


@dataclass(frozen=True)
class Restored:
    volume: Volume
    source: Path
    kept: Snapshot | None          # the replaced data, for an in-place restore
    seconds: float


def restore_in_place(snaps: Snapshots, volume: Volume, source: Path, *,
                     stop: Callable[[], None] = lambda: None,
                     start: Callable[[], None] = lambda: None,
                     fixup: Callable[[Path], None] = lambda path: None,
                     now: datetime | None = None) -> Restored:
    """Put the copy `source` in `volume`'s place; `fixup(staging)` may adjust the
    writable copy before the swap (PostgreSQL: pgverify.drop_stale_locks)."""
    _check_source(source)
    started = time.monotonic()
    staging = volume.path.with_name(f".{volume.name}.restoring")
    if staging.exists():
        _remove(staging)
    stop()
    try:
        # the replaced data, read-only, kept; named to the second, so a restore in the
        # second of another snapshot takes the next free one
        t = (now or snaps.clock()).astimezone(UTC).replace(microsecond=0)
        while (snaps.store.snapshots_dir / snapshot_name(volume.name, t)).exists():
            t += timedelta(seconds=1)
        kept = snaps.take(volume, now=t)
        _copy_writable(source, staging)
        fixup(staging)
        exchange(staging, volume.path)
        _remove(staging)                        # now the old tree
    finally:
        start()
    seconds = time.monotonic() - started
    log.info("volume restored in place", extra={"volume": volume.name, "source": str(source),
                                                "kept": kept.name, "seconds": round(seconds, 3)})
    return Restored(volume, source, kept, seconds)


def restore_into(snaps: Snapshots, source: Path, name: str) -> Restored:
    """A new volume `name` holding the copy `source` (the original stays as it is)."""
    _check_source(source)
    started = time.monotonic()
    volume = snaps.store.volume(name)
    if volume.path.exists():
        raise BackupError(f"volume {name} already exists", "restore into a new name, or "
                          "restore in place", status=409)
    _copy_writable(source, volume.path)
    seconds = time.monotonic() - started
    log.info("volume restored", extra={"volume": name, "source": str(source),
                                       "seconds": round(seconds, 3)})
    return Restored(volume, source, None, seconds)


def restore_tenant_dump(cluster: Any, dbname: str, dump: Path, *,
                        timeout: float = 600) -> float:
    """Put one shared-PostgreSQL tenant's database back from its `pg_dump -Fc` file
    (a PgDump hook's `<db>.dump` in a snapshot): `pg_restore --clean --if-exists
    --single-transaction` into that database alone, so the other tenants of the
    cluster are not touched and a failure changes nothing. Objects the dump holds are
    dropped and made again with its data; objects made after the dump (a new table)
    stay: replacing the whole database (restore into a new one, then swap names,
    with dbprovision's grants) is left. Returns seconds."""
    if not dump.is_file():
        raise NoSnapshot(f"no dump of {dbname} at {dump}",
                         "shared-PostgreSQL snapshots hold <db>.dump (the PgDump hook)")
    result = command.run([cluster.bin / "pg_restore", "--clean", "--if-exists",
                          "--single-transaction", "--exit-on-error", "-h", cluster.data,
                          "-p", str(cluster.port), "-U", "postgres", "-d", dbname, dump],
                         timeout=timeout, hint="nothing was changed (one transaction)")
    log.info("tenant database restored", extra={"database": dbname, "dump": str(dump),
                                                "seconds": round(result.seconds, 3)})
    return result.seconds
