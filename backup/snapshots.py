"""Snapshots of volumes: named `<volume>@<UTC time>` (ISO basic, 20261130T221500Z),
read-only, listed and parsed back from their names; hooks that make a volume's data
consistent on disk first.

Hooks run, in order, just before the snapshot; one that fails stops it (HookFailed).
- PostgresCheckpoint: a dedicated cluster's whole data directory (pg_wal included) is
  one volume, so an atomic snapshot is crash-consistent; a CHECKPOINT first makes the
  recovery at restore short.
- RedisAofRewrite: BGREWRITEAOF, then waits for `aof_rewrite_in_progress:0`.
- PgDump: a shared-PostgreSQL tenant's own database, `pg_dump -Fc` into the volume,
  so that one tenant can be restored alone.
"""
from __future__ import annotations

import builtins
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dbprovision.errors import CommandFailed

from .errors import BadSnapshotName, HookFailed, SnapshotExists
from .retention import Policy, plan
from .volumes import Volume, VolumeStore

log = logging.getLogger(__name__)

TIME_FORMAT = "%Y%m%dT%H%M%SZ"
NAME = re.compile(r"^(?P<volume>[A-Za-z0-9_.-]+)@(?P<time>\d{8}T\d{6}Z)$")


@dataclass(frozen=True, order=True)
class Snapshot:
    time: datetime
    volume: str
    path: Path

    @property
    def name(self) -> str:
        return snapshot_name(self.volume, self.time)


def snapshot_name(volume: str, t: datetime) -> str:
    return f"{volume}@{t.astimezone(UTC).strftime(TIME_FORMAT)}"


def parse_name(name: str) -> tuple[str, datetime]:
    m = NAME.match(name)
    if not m:
        raise BadSnapshotName(f"{name!r} is not a snapshot name",
                              "snapshots are named <volume>@YYYYMMDDTHHMMSSZ (UTC)")
    try:
        t = datetime.strptime(m.group("time"), TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise BadSnapshotName(f"{name!r} has an impossible time: {exc}") from exc
    return m.group("volume"), t


class Hook(Protocol):
    name: str

    def before(self, volume: Volume) -> None: ...


class PostgresCheckpoint:
    """CHECKPOINT on a connection the caller gives (a superuser's, autocommit)."""

    name = "postgres-checkpoint"

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect

    def before(self, volume: Volume) -> None:
        try:
            conn = self.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("CHECKPOINT")
            finally:
                conn.close()
        except Exception as exc:
            raise HookFailed(f"CHECKPOINT before snapshotting {volume.name} failed: {exc}",
                             "is the cluster running and the connection a superuser's?") \
                from exc


class RedisAofRewrite:
    """BGREWRITEAOF, then wait until INFO persistence says aof_rewrite_in_progress:0
    (and no rewrite is scheduled)."""

    name = "redis-bgrewriteaof"

    def __init__(self, client: Any, timeout: float = 60, poll: float = 0.02) -> None:
        self.client = client
        self.timeout = timeout
        self.poll = poll

    def before(self, volume: Volume) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            self.client.bgrewriteaof()
            while True:
                info = self.client.info("persistence")
                if not info.get("aof_rewrite_in_progress") and \
                        not info.get("aof_rewrite_scheduled"):
                    if info.get("aof_last_bgrewrite_status", "ok") != "ok":
                        raise HookFailed(f"Redis AOF rewrite for {volume.name} failed",
                                         "see the Redis server's log")
                    return
                if time.monotonic() > deadline:
                    raise HookFailed(f"Redis AOF rewrite for {volume.name} did not finish "
                                     f"within {self.timeout:g} s", "try again later")
                time.sleep(self.poll)
        except HookFailed:
            raise
        except Exception as exc:
            raise HookFailed(f"BGREWRITEAOF before snapshotting {volume.name} failed: {exc}",
                             "is the Redis server running?") from exc


class PgDump:
    """pg_dump -Fc of one tenant database of a shared cluster into the volume (the
    snapshot then holds `<db>.dump`). `cluster` is a dbprovision PgCluster."""

    name = "pg-dump"

    def __init__(self, cluster: Any, dbname: str, timeout: float = 600) -> None:
        self.cluster = cluster
        self.dbname = dbname
        self.timeout = timeout

    def before(self, volume: Volume) -> None:
        target = volume.path / f"{self.dbname}.dump"
        partial = volume.path / f".{self.dbname}.dump.partial"
        try:
            self.cluster.dump(self.dbname, partial, timeout=self.timeout)
        except CommandFailed as exc:
            partial.unlink(missing_ok=True)
            raise HookFailed(f"pg_dump of {self.dbname} failed: {exc.message}",
                             exc.hint) from exc
        partial.rename(target)


class Snapshots:
    """Take, list, delete and prune the snapshots of a VolumeStore's volumes."""

    def __init__(self, store: VolumeStore, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))

    def take(self, volume: Volume, hooks: Sequence[Hook] = (),
             now: datetime | None = None) -> Snapshot:
        t = (now or self.clock()).astimezone(UTC).replace(microsecond=0)
        path = self.store.snapshots_dir / snapshot_name(volume.name, t)
        if path.exists():
            raise SnapshotExists(f"snapshot {path.name} already exists")
        for hook in hooks:
            started = time.monotonic()
            hook.before(volume)
            log.info("snapshot hook ran", extra={"volume": volume.name, "hook": hook.name,
                                                 "seconds": round(time.monotonic() - started, 3)})
        previous = self.list(volume.name)
        seconds = self.store.snapshotter.snapshot(
            volume.path, path, previous[-1].path if previous else None)
        log.info("volume snapshotted", extra={"volume": volume.name, "snapshot": path.name,
                                              "kind": self.store.snapshotter.kind,
                                              "seconds": round(seconds, 4)})
        return Snapshot(t, volume.name, path)

    def list(self, volume: str | None = None) -> list[Snapshot]:
        """The snapshots (of one volume, or all), oldest first; other names ignored."""
        found = []
        for entry in self.store.snapshots_dir.iterdir():
            if not NAME.match(entry.name):
                continue
            name, t = parse_name(entry.name)
            if volume is None or name == volume:
                found.append(Snapshot(t, name, entry))
        return sorted(found)

    def delete(self, snapshot: Snapshot) -> None:
        self.store.snapshotter.delete(snapshot.path)
        log.info("snapshot deleted", extra={"snapshot": snapshot.name})

    def prune(self, volume: str, policy: Policy, *, now: datetime | None = None,
              dry_run: bool = False) -> builtins.list[tuple[Snapshot, bool, str]]:
        decisions = plan(self.list(volume), now or self.clock(), policy)
        for snap, keep, why in decisions:
            log.info("retention", extra={"snapshot": snap.name, "keep": keep, "why": why,
                                         "dry_run": dry_run})
            if not keep and not dry_run:
                self.delete(snap)
        return decisions
