"""Tenant data volumes and the snapshotter that copies them.

A volume root on btrfs gets btrfs: each volume a subvolume, each snapshot an atomic,
read-only subvolume snapshot (constant time, shares every block). Any other root gets
the fallback: each snapshot a hard-link tree made by `rsync -a --link-dest=<previous>`
(unchanged files share inodes with the previous snapshot, changed ones are copied).
`describe()` says which is in use and what it cannot guarantee; the CLI shows it.

Layout under a root: `volumes/<name>` (the live data) and `snapshots/<name>@<time>`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dbprovision import command

from . import btrfs
from .errors import BackupError

log = logging.getLogger(__name__)


class Snapshotter(Protocol):
    kind: str

    def create_volume(self, path: Path) -> None: ...

    def snapshot(self, src: Path, dest: Path, previous: Path | None) -> float: ...

    def delete(self, path: Path) -> None: ...

    def describe(self) -> str: ...


class BtrfsSnapshotter:
    kind = "btrfs"

    def create_volume(self, path: Path) -> None:
        btrfs.create_subvolume(path)

    def snapshot(self, src: Path, dest: Path, previous: Path | None) -> float:
        return btrfs.snapshot_readonly(src, dest)

    def delete(self, path: Path) -> None:
        if btrfs.is_subvolume(path):
            btrfs.delete_subvolume(path)
        else:       # taken by the fallback before the volume became a subvolume
            LinkDestSnapshotter().delete(path)

    def describe(self) -> str:
        return ("btrfs: each snapshot is an atomic, read-only subvolume snapshot (every "
                "file as of one instant, made in constant time); copies go offsite with "
                "btrfs send/receive, incremental against the previous snapshot. Like a "
                "power cut, it holds only what was written: data an app had not yet "
                "written (buffers, unflushed files) is not in it, and a database needs "
                "its pre-snapshot hook (CHECKPOINT, BGREWRITEAOF) or crash recovery")


class LinkDestSnapshotter:
    """`checksum` (the default) compares file contents with the previous snapshot
    (rsync --checksum: every file is read each time). Without it rsync's quick check
    (size + mtime) decides, and a file rewritten at the same size within one
    timestamp tick of the previous snapshot is linked as unchanged: the tests saw it
    happen with a 2-byte file within milliseconds."""

    kind = "rsync-link-dest"

    def __init__(self, checksum: bool = True) -> None:
        self.checksum = checksum

    def create_volume(self, path: Path) -> None:
        path.mkdir(mode=0o700)

    def snapshot(self, src: Path, dest: Path, previous: Path | None) -> float:
        started = time.monotonic()
        partial = dest.with_name(dest.name + ".partial")
        if partial.exists():
            self.delete(partial)
        argv: list[str | Path] = ["rsync", "-a", "--delete", "--numeric-ids", "-H"]
        if self.checksum:
            argv.append("--checksum")
        if previous is not None:
            argv.append(f"--link-dest={previous}")
        argv += [f"{src}/", f"{partial}/"]
        try:
            command.run(argv, timeout=3600,
                        hint="the partial snapshot was removed; nothing was replaced")
        except BaseException:
            if partial.exists():
                self.delete(partial)
            raise
        partial.chmod(0o555)        # a sign, not a guarantee: see describe()
        os.rename(partial, dest)    # only a whole tree ever carries the final name
        seconds = time.monotonic() - started
        log.info("snapshot copied", extra={"src": str(src), "dest": str(dest),
                                           "previous": str(previous or ""),
                                           "seconds": round(seconds, 4)})
        return seconds

    def delete(self, path: Path) -> None:
        if btrfs.is_subvolume(path):    # a btrfs snapshot of a volume that was adopted
            btrfs.delete_subvolume(path)
            return
        path.chmod(0o755)
        command.run(["rm", "-rf", "--one-file-system", path], timeout=600)

    def describe(self) -> str:
        compare = ("files are compared by content (every file is read at each snapshot)"
                   if self.checksum else
                   "files are compared by size and mtime only, so a file rewritten at the "
                   "same size within one timestamp tick of the previous snapshot is "
                   "taken as unchanged and linked")
        return ("rsync --link-dest fallback (the volume root is not on btrfs): each "
                "snapshot is a hard-link tree sharing unchanged files with the previous "
                f"one; {compare}. It cannot guarantee: atomicity across files (files are "
                "copied one after another while the app may write); a file changed "
                "during the copy may be torn; read-only-ness (linked files share their "
                "inode with older snapshots, so a write through any link changes them "
                "all); and its time and space grow with the number of files")


def choose(root: Path) -> Snapshotter:
    """btrfs when `root` is on btrfs, else the rsync --link-dest fallback."""
    chosen: Snapshotter = BtrfsSnapshotter() if btrfs.is_btrfs(root) else LinkDestSnapshotter()
    log.info("snapshotter chosen", extra={"root": str(root), "kind": chosen.kind})
    return chosen


@dataclass(frozen=True)
class Volume:
    name: str
    path: Path


class VolumeStore:
    """The volumes and snapshots under one root, with the snapshotter that suits it."""

    def __init__(self, root: Path, snapshotter: Snapshotter | None = None) -> None:
        self.root = root
        self.volumes_dir = root / "volumes"
        self.snapshots_dir = root / "snapshots"
        for d in (self.root, self.volumes_dir, self.snapshots_dir):
            d.mkdir(parents=True, exist_ok=True)
            # passable, not listable: a volume's own user (postgres, an app's) reaches
            # its volume; each volume and snapshot keeps its own owner and mode
            d.chmod(0o711)
        self.snapshotter = snapshotter or choose(root)

    def describe(self) -> str:
        return self.snapshotter.describe()

    def volume(self, name: str) -> Volume:
        _check_name(name)
        return Volume(name, self.volumes_dir / name)

    def create(self, name: str) -> Volume:
        vol = self.volume(name)
        if vol.path.exists():
            raise BackupError(f"volume {name} already exists at {vol.path}",
                              "pick another name or use the existing volume", status=409)
        self.snapshotter.create_volume(vol.path)
        log.info("volume created", extra={"volume": name, "kind": self.snapshotter.kind})
        return vol


def _check_name(name: str) -> None:
    ok = name and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
    if not ok:
        raise BackupError(f"invalid volume name {name!r}",
                          "use letters, digits, '-', '_' and '.' (not first)", status=400)
