"""What keeps tenants' servers and apps stopped while a backup job changes their data,
and what brings them back.

- A dedicated server is an Instance on a runner (runner/services.py), which would take
  a stop by PID for a crash and restart it on data being swapped. `Supervisor.pause`
  has the runners stop it on command and not serve it until `resume`: the controller
  filters what it serves through `ServerPauses` (a pause nobody lifts, its job having
  died, ends by itself); `ControllerSupervisor` is the controller's side, a job worker
  reaches it through `POST /v1/platform/addons/<id>/pause` (controller/backupjobs.py).
- An app's formation while an in-place restore has the app at 0 is written down
  (`remember_formation`), so a controller that dies mid-restore scales it back.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from backup.errors import BackupError
from messaging.shapes import ServiceSpec

log = logging.getLogger(__name__)

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
