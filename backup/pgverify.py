"""The `verify` of a PostgreSQL copy: start the cluster a snapshot holds, in a scratch
directory, run a query, stop it. A dedicated cluster's volume is its PgCluster root
(`data/` with pg_wal, `server.log`), so a crash-consistent snapshot starts by ordinary
crash recovery.

The scratch copy is a writable btrfs snapshot when the copy and the scratch dir share
a btrfs filesystem (constant time), else an `rsync -a` copy. The snapshot's stale
postmaster.pid is removed (the copy is known not to run), and Berth's settings are
rewritten for the scratch port and socket directory (PgCluster.init on an initialized
directory only rewrites berth.conf).
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbprovision import command
from dbprovision.command import RunAs
from dbprovision.errors import CommandFailed
from dbprovision.pgcluster import PgCluster

from . import btrfs
from .errors import BackupError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PgVerified:
    rows: list[tuple[Any, ...]]
    copy_seconds: float
    start_seconds: float


def scratch_copy(copy: Path, scratch: Path) -> float:
    """`scratch` (not existing yet) becomes a writable copy of `copy`; returns seconds."""
    started = time.monotonic()
    # st_dev and statfs's fsid both differ per btrfs subvolume, so "the same
    # filesystem" is found by trying: a clone across filesystems fails (EXDEV)
    cloned = False
    if btrfs.is_subvolume(copy) and btrfs.is_btrfs(scratch.parent):
        try:
            btrfs.clone_writable(copy, scratch)
            cloned = True
        except CommandFailed as exc:
            log.info("no clone, copying", extra={"copy": str(copy), "why": exc.message})
    if not cloned:
        command.run(["rsync", "-a", "--numeric-ids", "-H", f"{copy}/", f"{scratch}/"],
                    timeout=3600)
    return time.monotonic() - started


def drop_stale_locks(root: Path) -> None:
    """A snapshot of a running cluster holds its postmaster.pid and its socket's
    lock file (the socket lives in the data dir); a copy never runs under that PID,
    and a reused PID must not make PostgreSQL refuse to start."""
    data = root / "data"
    (data / "postmaster.pid").unlink(missing_ok=True)
    for stale in data.glob(".s.PGSQL.*"):
        stale.unlink(missing_ok=True)


def verify_postgres(copy: Path, scratch: Path, port: int, query: str, *,
                    dbname: str = "postgres", user: RunAs | None = None,
                    address: str = "127.0.0.1") -> PgVerified:
    """Start the cluster of `copy` in `scratch` on `port`, run `query`, stop it. The
    scratch copy is left for the caller to remove (or to keep, as a restore)."""
    seconds = scratch_copy(copy, scratch)
    drop_stale_locks(scratch)
    cluster = PgCluster(scratch, address, port, user=user)
    if not cluster.initialized():
        raise BackupError(f"{copy} holds no PostgreSQL cluster (no data/PG_VERSION)",
                          "verify_postgres takes a dedicated cluster's volume snapshot")
    cluster.init()
    started = time.monotonic()
    cluster.start()
    try:
        cluster.wait_ready()
        start_seconds = time.monotonic() - started
        with closing(cluster.connect(dbname)) as conn, conn.cursor() as cur:
            cur.execute(query)
            rows = [tuple(r) for r in cur.fetchall()]
    finally:
        cluster.stop()
    log.info("postgres copy verified", extra={"copy": str(copy), "scratch": str(scratch),
                                              "copy_seconds": round(seconds, 3),
                                              "start_seconds": round(start_seconds, 3)})
    return PgVerified(rows, seconds, start_seconds)
