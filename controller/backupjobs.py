"""The backup jobs: celery beat has every tenant volume snapshotted every
`backup_snapshot_seconds` and pruned by `backup_policy` every `backup_prune_seconds`
(controller/backups.py knows the volumes; backup/ does the work).

The tasks run on the job workers' app (`python -m controller.jobs worker|beat` imports
this module after configuring the app and calls `install`, which adds `schedule()` to
celery beat's). A volume another job holds is
skipped, not waited for (the next run takes it); one volume's failure is logged and
the others go on. The beat entries expire before the next run, so a backlog of missed
runs (workers down for a day) is not replayed as a burst of snapshots.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backup.errors import BackupError
from controller.backups import PAUSE_SECONDS, BackupBusy, Catalog
from controller.jobs import api, app, provisioner, settings
from controller.settings import SPEC

log = logging.getLogger(__name__)

SNAPSHOT_ALL = "berth.backup_snapshot_all"
PRUNE_ALL = "berth.backup_prune_all"


def schedule(s: SimpleNamespace) -> dict[str, dict[str, Any]]:
    """celery beat's entries for the backup jobs (settings made by hand, as in tests,
    may lack the backup ones: their declared defaults then)."""
    def get(name: str) -> float:
        return float(getattr(s, name, SPEC.settings[name].default))

    snap, prune = get("backup_snapshot_seconds"), get("backup_prune_seconds")
    return {
        "backup-snapshots": {"task": SNAPSHOT_ALL, "schedule": snap,
                             "options": {"expires": snap}},
        "backup-prune": {"task": PRUNE_ALL, "schedule": prune,
                         "options": {"expires": prune}},
    }


def install(s: SimpleNamespace) -> None:
    """After controller.jobs.configure, in the workers and beat: these tasks are
    registered by this module's import, and their entries join beat's schedule."""
    app.conf.beat_schedule.update(schedule(s))


class ApiSupervisor:
    """A worker's side of pausing an addon's servers: the controller's platform
    endpoint, which answers once the runners stopped them."""

    def pause(self, addon_id: str) -> bool:
        return bool(api().call("POST", f"/v1/platform/addons/{addon_id}/pause",
                               {"seconds": PAUSE_SECONDS}).get("supervised"))

    def resume(self, addon_id: str) -> None:
        api().call("POST", f"/v1/platform/addons/{addon_id}/pause", {"seconds": 0})


def catalog() -> Catalog:
    """The volumes, with the controller's supervision when the workers report to one
    (`berth up`; a bare test has no controller and no runners)."""
    s = settings()
    has_api = bool(s.platform_token or (Path(s.data_dir) / "platform.token").exists())
    return Catalog.from_settings(s, provisioner, ApiSupervisor() if has_api else None)


@app.task(name=SNAPSHOT_ALL, acks_late=False, shared=False)
def snapshot_all() -> dict[str, str]:
    """Snapshot every volume: {volume: snapshot name, "busy" or "failed: ..."}."""
    out: dict[str, str] = {}
    cat = catalog()
    for pv in cat.volumes():
        try:
            out[pv.name] = cat.snapshot(pv.name).name
        except BackupBusy:
            out[pv.name] = "busy"
            log.info("backup skipped: volume busy", extra={"volume": pv.name})
        except Exception as exc:      # one volume's failure does not stop the others
            out[pv.name] = f"failed: {exc.message if isinstance(exc, BackupError) else exc}"
            log.exception("snapshot failed", extra={"volume": pv.name})
    return out


@app.task(name=PRUNE_ALL, acks_late=False, shared=False)
def prune_all(dry_run: bool = False) -> dict[str, list[str]]:
    """Prune every volume by the policy: {volume: names pruned (or that would be)}."""
    out: dict[str, list[str]] = {}
    cat = catalog()
    for pv in cat.volumes():
        try:
            decisions = cat.prune(pv.name, dry_run=dry_run)
            out[pv.name] = [s.name for s, keep, _ in decisions if not keep]
        except BackupBusy:
            log.info("prune skipped: volume busy", extra={"volume": pv.name})
        except Exception:
            log.exception("prune failed", extra={"volume": pv.name})
    return out
