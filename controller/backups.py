"""The platform's backup volumes and what is done to them: the bridge between backup/
(snapshots, retention, manifests, restore, verify) and where tenant data lives.

Volumes (`Catalog.volumes()`), each named for what it holds:
- `app-<app>`: an app's data dir, `<apps_dir>/<app>/data` (BERTH_DATA_DIR), for every
  runner apps_dir in `backup_apps_dirs`; snapshots in `<apps_dir>/../backups`;
- `addon-<id>`: a dedicated PostgreSQL's root (data/ with pg_wal, the server log,
  PgBouncer's dir) or a dedicated Redis's (AOF in appendonly/), under the job
  workers' addons_dir; a shared-PostgreSQL tenant's `pg_dump -Fc` of its own database
  (a volume of its own in the backup dir, refreshed before each snapshot).
  Snapshots in `backup_dir` (default `<addons_dir>/backups`).
ha addons and the shared Redis are not covered yet (see docs/architecture.md).

Each snapshot runs its volume's hook first (CHECKPOINT, BGREWRITEAOF + wait, pg_dump)
and writes the manifest the offsite puller verifies against. One job at a time per
volume: a flock per volume (a second caller is told it is busy, not queued), and, for
an addon, the provisioner's own lock on it, so no provision, destroy or quota check
(which restarts stopped servers) runs during a snapshot or a restore.

Snapshotter per volume: btrfs when the volume is a subvolume. A dedicated server's
root, made by the provisioner as a plain directory, is adopted once on a btrfs root
(the server stopped, its files reflinked into a new subvolume, the two swapped
atomically, the server started: about a second). An app's data dir is not adopted (its
instances run on a runner); until it is a subvolume it gets the rsync --link-dest
fallback, and `berth backup list` says so and what that cannot guarantee.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from backup import btrfs, manifest, offsite
from backup.errors import BackupError
from backup.pgverify import drop_stale_locks, verify_postgres
from backup.restore import Restored, as_of, exchange, restore_in_place, restore_into
from backup.retention import Policy
from backup.snapshots import (
    Hook,
    PgDump,
    PostgresCheckpoint,
    RedisAofRewrite,
    Snapshot,
    Snapshots,
    parse_name,
)
from backup.volumes import BtrfsSnapshotter, LinkDestSnapshotter, Snapshotter, Volume, VolumeStore
from dbprovision import command
from dbprovision.pgdedicated import PgDedicated
from dbprovision.ports import free_port
from dbprovision.redisdedicated import RedisDedicated
from dbprovision.redisserver import RedisServer
from messaging.shapes import ServiceSpec

if TYPE_CHECKING:
    from dbprovision.records import AddonRecord
    from dbprovision.service import Provisioner

log = logging.getLogger(__name__)

BACKUP_ADMIN = "backup-admin"
"""The role (a token's name in the store) the API asks of backup endpoints."""

Progress = Callable[[str], None]
"""Told each step as it starts (the API streams them to `berth backup restore`)."""


SERVER_KINDS = ("postgres", "redis", "postgres-shared", "redis-shared")
SHARED_KINDS = ("postgres-shared", "redis-shared")


class BackupBusy(BackupError):
    code = "backup_busy"
    status = 409
    default_hint = "another backup job holds this volume; try again when it is done"


class NoVolume(BackupError):
    code = "no_volume"
    status = 404
    default_hint = "`berth backup list` shows the volumes there are"


PAUSE_SECONDS = 900.0       # a pause nobody lifts (its job died) ends by itself
STOP_WAIT = 60.0            # seconds for runners to stop a paused addon's servers


class Supervisor(Protocol):
    """Who keeps an addon's servers running (the runners, through the controller):
    `pause` has them stopped and not restarted, and says whether any runner was
    supervising them; `resume` lets them be served again."""

    def pause(self, addon_id: str) -> bool: ...

    def resume(self, addon_id: str) -> None: ...


class ServerPauses:
    """The addons whose servers runners must not serve now (a restore or an adoption
    has them stopped); the controller filters what it serves through it."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def pause(self, addon_id: str, seconds: float = PAUSE_SECONDS) -> None:
        with self._lock:
            self._until[addon_id] = time.monotonic() + seconds

    def resume(self, addon_id: str) -> None:
        with self._lock:
            self._until.pop(addon_id, None)

    def paused(self, addon_id: str) -> bool:
        with self._lock:
            until = self._until.get(addon_id)
            if until is not None and until < time.monotonic():
                del self._until[addon_id]
                log.warning("backup pause expired", extra={"addon": addon_id})
                until = None
            return until is not None

    def filter(self, wanted: list[ServiceSpec]) -> list[ServiceSpec]:
        return [spec for spec in wanted if not self.paused(spec.addon)]


class ControllerSupervisor:
    """The controller's side: pause through its ServerPauses and wait for the runners'
    heartbeats to list none of the addon's servers (they were stopped on command,
    not as a crash, so no restart)."""

    def __init__(self, controller: Any) -> None:
        self.c = controller

    def pause(self, addon_id: str, seconds: float = PAUSE_SECONDS) -> bool:
        supervised = bool(self.c.services_of(addon_id))
        self.c.server_pauses.pause(addon_id, seconds)
        self.c.wake()
        deadline = time.monotonic() + STOP_WAIT
        while self.c.services_of(addon_id):
            if time.monotonic() > deadline:
                self.resume(addon_id)
                raise BackupError(f"the runners did not stop addon {addon_id}'s servers "
                                  f"within {STOP_WAIT:g} s; nothing was changed",
                                  "see `berth addons info` and the runner's log; try again",
                                  status=503)
            time.sleep(0.1)
        log.info("addon servers paused", extra={"addon": addon_id, "supervised": supervised})
        return supervised

    def resume(self, addon_id: str) -> None:
        self.c.server_pauses.resume(addon_id)
        self.c.wake()
        log.info("addon servers resumed", extra={"addon": addon_id})


@dataclass
class PlatformVolume:
    """A tenant data volume: its name, what it is, where it lives, how to snapshot it."""

    name: str
    kind: str                   # app-data | postgres | redis | postgres-tenant
    owner: str                  # the app, or the addon id
    path: Path
    store_root: Path
    record: AddonRecord | None = None
    notes: list[str] = field(default_factory=list)
    lock: str | None = None     # the provisioner's lock held while working on it

    @property
    def server_kind(self) -> bool:
        """A server's whole root (stopped and started around adoption and restore)."""
        return self.kind in SERVER_KINDS

    @property
    def volume(self) -> Volume:
        return Volume(self.name, self.path)


class Catalog:
    def __init__(self, addons_dir: Path, backup_dir: Path | None = None,
                 apps_dirs: Sequence[Path] = (), policy: str = "24h 7d 4w 12m min=3", *,
                 provisioner: Callable[[], Provisioner] | None = None,
                 clock: Callable[[], datetime] | None = None,
                 supervisor: Supervisor | None = None) -> None:
        self.addons_dir = addons_dir
        self.backup_dir = backup_dir or addons_dir / "backups"
        self.apps_dirs = list(apps_dirs)
        self.policy = Policy.parse(policy)
        self._provisioner = provisioner
        self.clock = clock or (lambda: datetime.now(UTC))
        self.supervisor = supervisor

    @classmethod
    def from_settings(cls, s: Any, provisioner: Callable[[], Provisioner] | None = None,
                      supervisor: Supervisor | None = None) -> Catalog:
        addons = Path(s.addons_dir).resolve()
        return cls(addons, Path(s.backup_dir).resolve() if s.backup_dir else None,
                   [Path(p).resolve() for p in s.backup_apps_dirs], s.backup_policy,
                   provisioner=provisioner or _provisioner_for(s), supervisor=supervisor)

    def provisioner(self) -> Provisioner:
        if self._provisioner is None:
            raise BackupError("no provisioner to find the addon volumes with",
                              "run this in a job worker, or give Catalog one")
        return self._provisioner()

    # -- what there is ----------------------------------------------------------------

    def volumes(self) -> list[PlatformVolume]:
        found: list[PlatformVolume] = []
        for apps_dir in self.apps_dirs:
            if not apps_dir.is_dir():
                continue
            for data in sorted(apps_dir.glob("*/data")):
                app = data.parent.name
                found.append(PlatformVolume(f"app-{app}", "app-data", app, data,
                                            apps_dir.parent / "backups"))
        if (self.addons_dir / "addons").is_dir():
            prov = self.provisioner()
            for record in prov.records.all():
                pv = self._addon_volume(prov, record)
                if pv is not None:
                    found.append(pv)
            # the shared servers whole: every tenant at one instant (disaster recovery;
            # one tenant comes back from its own addon-<id> volume)
            if prov.pg.initialized():
                found.append(PlatformVolume("postgres-shared", "postgres-shared", "shared",
                                            prov.pg.root, self.backup_dir, lock="servers"))
            if prov.redis.configured():
                found.append(PlatformVolume("redis-shared", "redis-shared", "shared",
                                            prov.redis.root, self.backup_dir, lock="servers"))
        return found

    def _addon_volume(self, prov: Provisioner, record: AddonRecord) -> PlatformVolume | None:
        name = f"addon-{record.addon_id}"
        if record.state != "ready":
            return None
        if (record.engine, record.plan) == ("postgres", "shared"):
            path = self.backup_dir / "volumes" / name
            return PlatformVolume(name, "postgres-tenant", record.addon_id, path,
                                  self.backup_dir, record, lock=record.name)
        if record.plan == "dedicated":
            server = prov._dedicated(record)     # the provisioner knows the root
            root = server.root if isinstance(server, PgDedicated) else \
                server.server.root if isinstance(server, RedisDedicated) else None
            if root is None:
                return None
            return PlatformVolume(name, record.engine, record.addon_id, root,
                                  self.backup_dir, record, lock=record.name)
        return None                         # ha, shared redis: not yet

    def volume(self, name: str) -> PlatformVolume:
        for pv in self.volumes():
            if pv.name == name:
                return pv
        raise NoVolume(f"no backup volume {name!r}")

    def snapshotter(self, pv: PlatformVolume) -> Snapshotter:
        """btrfs when the volume is (or, for a server's root, can become) a subvolume on
        a btrfs root; else the rsync --link-dest fallback."""
        pv.store_root.mkdir(parents=True, exist_ok=True)
        if not btrfs.is_btrfs(pv.store_root):
            return LinkDestSnapshotter()
        if pv.kind == "app-data" and pv.path.exists() and not btrfs.is_subvolume(pv.path):
            pv.notes.append("the app's data dir is not a btrfs subvolume (make it one "
                            "while the app is stopped to get atomic snapshots)")
            return LinkDestSnapshotter()
        return BtrfsSnapshotter()

    def snapshots(self, pv: PlatformVolume) -> Snapshots:
        return Snapshots(VolumeStore(pv.store_root, self.snapshotter(pv)), self.clock)

    def describe(self, pv: PlatformVolume) -> dict[str, Any]:
        snapper = self.snapshotter(pv)
        snaps = self.snapshots(pv).list(pv.name)
        return {"name": pv.name, "kind": pv.kind, "owner": pv.owner, "path": str(pv.path),
                "snapshotter": snapper.kind, "guarantees": snapper.describe(),
                "notes": pv.notes, "policy": str(self.policy),
                "snapshots": [{"name": s.name, "time": s.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               "manifest": manifest.manifest_path(s.path).exists(),
                               "verified": manifest.is_complete(s.path)} for s in snaps]}

    # -- one job per volume -----------------------------------------------------------

    @contextlib.contextmanager
    def busy(self, pv: PlatformVolume) -> Iterator[None]:
        """This volume's lock (not waited for: BackupBusy), and its addon's."""
        locks = self.backup_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        locks.chmod(0o700)
        fd = os.open(locks / f"{pv.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupBusy(f"volume {pv.name} is busy with another backup job") \
                    from None
            if pv.lock is not None:
                with self.provisioner().records.lock(pv.lock):
                    yield
            else:
                yield
        finally:
            os.close(fd)

    # -- snapshot, prune ----------------------------------------------------------------

    def snapshot(self, name: str, now: datetime | None = None) -> Snapshot:
        pv = self.volume(name)
        with self.busy(pv):
            snaps = self.snapshots(pv)
            self._prepare(pv, snaps)
            snap = snaps.take(pv.volume, hooks=self._hooks(pv), now=now)
            manifest.write(snap.path)
        return snap

    def prune(self, name: str, *, dry_run: bool = False, now: datetime | None = None
              ) -> list[tuple[Snapshot, bool, str]]:
        pv = self.volume(name)
        with self.busy(pv):
            decisions = self.snapshots(pv).prune(pv.name, self.policy, now=now,
                                                 dry_run=dry_run)
            if not dry_run:
                for snap, keep, _ in decisions:
                    if not keep:
                        for side in (manifest.manifest_path(snap.path),
                                     manifest.stamp_path(snap.path)):
                            side.unlink(missing_ok=True)
        return decisions

    def _prepare(self, pv: PlatformVolume, snaps: Snapshots) -> None:
        """Make the volume exist (a tenant's dump volume) or a subvolume (a server's
        root on btrfs, adopted once)."""
        if pv.kind == "postgres-tenant" and not pv.path.exists():
            snaps.store.create(pv.name)
        elif pv.server_kind and \
                snaps.store.snapshotter.kind == "btrfs" and not btrfs.is_subvolume(pv.path):
            self._adopt(pv)

    def _adopt(self, pv: PlatformVolume) -> None:
        """A plain directory becomes a subvolume holding the same files: the server
        stopped, the files reflinked (`cp -a --reflink=always`, no data copied), the
        two swapped atomically, the server started again."""
        started = time.monotonic()
        server = self._server(pv)
        staging = pv.path.with_name(f".{pv.path.name}.adopting")
        if staging.exists():
            command.run(["rm", "-rf", "--one-file-system", staging], timeout=600)
        server.stop()
        try:
            btrfs.create_subvolume(staging)
            command.run(["cp", "-a", "--reflink=always", f"{pv.path}/.", f"{staging}/"],
                        timeout=3600, hint="the volume was left as it was")
            st = pv.path.stat()
            os.chown(staging, st.st_uid, st.st_gid)
            staging.chmod(st.st_mode & 0o7777)
            exchange(staging, pv.path)
            command.run(["rm", "-rf", "--one-file-system", staging], timeout=3600)
        finally:
            server.start()
        log.info("volume adopted as a subvolume", extra={
            "volume": pv.name, "path": str(pv.path),
            "seconds": round(time.monotonic() - started, 3)})

    def _server(self, pv: PlatformVolume) -> _Server:
        """The server whose root `pv` is: how to stop, start and quiesce it."""
        prov = self.provisioner()
        if pv.kind == "postgres-shared":
            cluster = prov.pg
            return _Server(cluster.stop, cluster.start,
                           lambda: [PostgresCheckpoint(cluster.connect)]
                           if cluster.is_running() else [])
        if pv.kind == "redis-shared":
            redis = prov.redis
            return _Server(redis.stop, redis.start,
                           lambda: [_RedisHook(redis)] if redis.is_running() else [])
        assert pv.record is not None
        server = prov._dedicated(pv.record)      # the provisioner knows the servers
        addon_id = pv.record.addon_id
        if isinstance(server, PgDedicated):
            pg = server
            stop, start = self._supervised(addon_id, pg.stop, pg.ensure_running)
            return _Server(stop, start, lambda: [PostgresCheckpoint(pg.cluster.connect)]
                           if pg.cluster.is_running() else [])
        assert isinstance(server, RedisDedicated)
        red = server
        stop, start = self._supervised(addon_id, red.stop, red.ensure_running)
        return _Server(stop, start,
                       lambda: [_RedisHook(red.server)] if red.server.is_running() else [])

    def _supervised(self, addon_id: str, stop: Callable[[], None],
                    start: Callable[[], None]) -> tuple[Callable[[], None], Callable[[], None]]:
        """A dedicated server's stop and start, when runners may supervise it: paused
        first (a runner would take a stop by PID for a crash and restart it, on data
        being swapped), stopped by PID too (idempotent; what no runner serves), then
        served again: by the runner when one served it, else started here first."""
        supervised = [False]

        def paused_stop() -> None:
            if self.supervisor is not None:
                supervised[0] = self.supervisor.pause(addon_id)
            stop()

        def resumed_start() -> None:
            try:
                if not supervised[0]:
                    start()
            finally:
                if self.supervisor is not None:
                    self.supervisor.resume(addon_id)
        return paused_stop, resumed_start

    def _hooks(self, pv: PlatformVolume) -> list[Hook]:
        if pv.server_kind:
            return self._server(pv).hooks()
        if pv.kind == "postgres-tenant":
            assert pv.record is not None
            return [PgDump(self.provisioner().pg, pv.record.name)]
        return []

    # -- restore, verify ----------------------------------------------------------------

    def choose(self, name: str, at: datetime | None, from_copies: Path | None = None
               ) -> tuple[PlatformVolume, Snapshot]:
        """The newest snapshot at or before `at`: of the volume's own, or of the
        complete (verified) copies of it in `from_copies` (copies brought back from the
        offsite host)."""
        pv = self.volume(name)
        if from_copies is None:
            snaps = self.snapshots(pv).list(pv.name)
        else:
            if not from_copies.is_dir():
                raise NoVolume(f"no directory of copies at {from_copies}",
                               "give the directory `berth backup pull` filled, brought "
                               "to this host")
            snaps = [Snapshot(parse_name(p.name)[1], pv.name, p)
                     for p in offsite.complete_copies(from_copies, pv.name)]
        return pv, as_of(snaps, at or self.clock())

    def restore(self, name: str, at: datetime | None = None, *, into: str | None = None,
                from_copies: Path | None = None,
                stop: Callable[[], None] | None = None,
                start: Callable[[], None] | None = None,
                progress: Progress = lambda step: None) -> Restored:
        """In place (the consumers stopped, the current data kept as a snapshot, the
        chosen snapshot swapped in, the consumers started), or `into` a new volume of
        that name in the volume's backup dir. `stop`/`start` are the consumers (an
        app's instances, given by the controller); a server's are its own. With
        `from_copies`, from a verified offsite copy; its files are given back to the
        volume's owner (a pull by the offsite host's own user does not keep owners)."""
        pv, snap = self.choose(name, at, from_copies)
        progress(f"chosen {snap.name}")
        with self.busy(pv):
            if manifest.manifest_path(snap.path).exists() and \
                    not manifest.is_complete(snap.path):
                progress(f"checking {snap.name} against its manifest")
                manifest.verify(snap.path)      # a copy that does not match is refused
            snaps = self.snapshots(pv)
            if into is not None:
                progress(f"copying {snap.name} into the new volume {into}")
                return restore_into(snaps, snap.path, into)
            if from_copies is not None and pv.kind == "postgres-tenant":
                raise BackupError("a shared tenant is restored from its local snapshots",
                                  "restore the copy --into a new volume, then pg_restore "
                                  "its dump")
            if pv.kind == "postgres-tenant":
                assert pv.record is not None
                from backup.restore import restore_tenant_dump
                progress(f"pg_restore of {pv.record.name} from {snap.name}")
                started = time.monotonic()
                restore_tenant_dump(self.provisioner().pg, pv.record.name,
                                    snap.path / f"{pv.record.name}.dump")
                return Restored(pv.volume, snap.path, None, time.monotonic() - started)
            if pv.kind in SHARED_KINDS:
                raise BackupError(f"{pv.name} in place would take every tenant of the "
                                  "shared server back in time",
                                  "restore it --into a new volume, or one tenant from its "
                                  "own addon-<id> volume", status=409)
            if pv.server_kind:
                server = self._server(pv)
                stop, start = server.stop, server.start
            owner = pv.path.stat()

            def fixup(path: Path) -> None:
                if from_copies is not None:
                    command.run(["chown", "-R", f"{owner.st_uid}:{owner.st_gid}", path],
                                timeout=3600)
                if pv.kind in ("postgres", "postgres-shared"):
                    drop_stale_locks(path)

            def stopping() -> None:
                progress("stopping the consumers")
                (stop or (lambda: None))()
                progress("keeping the current data as a snapshot; swapping")

            def starting() -> None:
                try:
                    progress("starting the consumers")
                finally:            # whatever happened, they run again
                    (start or (lambda: None))()

            done = restore_in_place(snaps, pv.volume, snap.path, stop=stopping,
                                    start=starting, fixup=fixup, now=self.clock())
            if done.kept is not None:       # pulled offsite and verifiable like any other
                manifest.write(done.kept.path)
            return done

    def verify(self, name: str, at: datetime | None = None, *,
               progress: Progress = lambda step: None) -> dict[str, Any]:
        """Checksums against the snapshot's manifest; a PostgreSQL snapshot is also
        started in a scratch directory and queried."""
        pv, snap = self.choose(name, at)
        out: dict[str, Any] = {"volume": pv.name, "snapshot": snap.name}
        progress(f"checking {snap.name} against its manifest")
        if manifest.manifest_path(snap.path).exists():
            out["files"] = manifest.verify(snap.path)
        else:
            out["files"] = None
            out["note"] = "no manifest (a snapshot taken before manifests were written)"
        if pv.kind in ("postgres", "postgres-shared"):
            progress("starting PostgreSQL on a scratch copy")
            scratch_dir = self.backup_dir / "scratch"
            scratch_dir.mkdir(parents=True, exist_ok=True)
            scratch_dir.chmod(0o711)
            # short: the cluster's unix socket below it must fit in 107 bytes
            scratch = scratch_dir / secrets.token_hex(4)
            try:
                got = verify_postgres(snap.path, scratch, free_port("127.0.0.1"),
                                      "SELECT datname FROM pg_database WHERE NOT "
                                      "datistemplate ORDER BY 1")
            finally:
                if scratch.exists():
                    if btrfs.is_subvolume(scratch):
                        btrfs.delete_subvolume(scratch)
                    else:
                        shutil.rmtree(scratch, ignore_errors=True)
            out["databases"] = [r[0] for r in got.rows]
            out["start_seconds"] = round(got.start_seconds, 3)
        progress("verified")
        return out


@dataclass(frozen=True)
class _Server:
    stop: Callable[[], None]
    start: Callable[[], None]
    hooks: Callable[[], list[Hook]]


class _RedisHook:
    """BGREWRITEAOF on a redis-server's admin connection, waited for."""

    name = "redis-bgrewriteaof"

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def before(self, volume: Volume) -> None:
        with self.server.admin() as client:
            RedisAofRewrite(client).before(volume)


def _provisioner_for(s: Any) -> Callable[[], Provisioner]:
    """A Provisioner over the job workers' addons_dir, made at first use (as
    controller.jobs.provisioner does in a worker)."""
    made: list[Provisioner] = []

    def get() -> Provisioner:
        if not made:
            from dbprovision.service import Provisioner
            made.append(Provisioner(Path(s.addons_dir).resolve(), s.addon_address,
                                    s.addon_pg_port, s.addon_redis_port))
        return made[0]
    return get


# -- an app's formation while a restore has it at 0 ------------------------------------

def remember_formation(data_dir: Path, app: str, formation: dict[str, int]) -> None:
    """Written before an in-place restore scales `app` to 0, removed when it is scaled
    back: a controller that dies in between scales it back when it starts."""
    d = data_dir / "restoring"
    d.mkdir(mode=0o700, exist_ok=True)
    tmp = d / f".{app}.json"
    tmp.write_text(json.dumps(formation))
    os.replace(tmp, d / f"{app}.json")


def forget_formation(data_dir: Path, app: str) -> None:
    (data_dir / "restoring" / f"{app}.json").unlink(missing_ok=True)


def interrupted_restores(data_dir: Path) -> dict[str, dict[str, int]]:
    """{app: formation} of the restores a dead controller left with the app at 0."""
    d = data_dir / "restoring"
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} \
        if d.is_dir() else {}
