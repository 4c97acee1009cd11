"""What the provisioner keeps about each addon on its own disk, and its locks.

A record is written (with the password it will use) before the first server-side
step, so a provisioner that dies half-way finds the same name and password on its
next try and finishes the job instead of making a second one; it is removed only after
the server side is gone. Files are the platform's (root's), 0600 in a 0700 dir: the
controller holds the same secrets, and no app can read these.

Locks are flock()s on files beside the records, one per addon plus one per shared
server, so two Celery workers on one host never provision or destroy the same addon
at once; the kernel drops them if a worker dies.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import AddonBusy


@dataclass
class AddonRecord:
    addon_id: str
    engine: str
    plan: str
    name: str
    password: str
    host: str
    port: int = 0                    # the port of the app's URL
    state: str = "creating"          # creating -> ready
    quota_mb: int | None = None
    created: float = field(default_factory=time.time)
    direct_port: int = 0             # dedicated Postgres: the cluster's own, behind PgBouncer
    # ha: the hosts of its nodes (primary, standby, third Sentinel), chosen at creation
    # among the db hosts; empty: the provisioner's default ha addresses
    nodes: list[str] = field(default_factory=list)


class Records:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "addons"
        self.locks = root / "locks"
        for d in (self.dir, self.locks):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)

    def get(self, name: str) -> AddonRecord | None:
        try:
            data = json.loads((self.dir / f"{name}.json").read_text())
        except FileNotFoundError:
            return None
        return AddonRecord(**data)

    def put(self, record: AddonRecord) -> None:
        path = self.dir / f"{record.name}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        (self.dir / f"{name}.json").unlink(missing_ok=True)

    def all(self) -> list[AddonRecord]:
        return [r for p in sorted(self.dir.glob("*.json")) if (r := self.get(p.stem))]

    @contextmanager
    def lock(self, key: str, timeout: float = 120.0) -> Iterator[None]:
        """Hold the lock named `key` (an addon's name, or a server's) for the block."""
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AddonBusy(f"{key} is busy: another job holds its lock",
                                        "retry when the other job is done") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)
