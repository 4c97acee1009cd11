"""A worker that locks a record before working on it (the tapiriik pattern), run as
its own process by tests/integration/test_locks.py:

    python -m tests.integration.lockworker ENDPOINT RECORD DIR hang|finish OWNER

It appends `started OWNER FENCE` to DIR/attempts, then either hangs holding the lease
(renewed by its thread, until it is killed) or works briefly, appends `done OWNER
FENCE` to DIR/done and releases the lease."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from messaging.locks import LockClient

TTL = 1.0


def main(endpoint: str, record: str, out: str, mode: str, owner: str) -> None:
    out_dir = Path(out)
    with LockClient(endpoint, owner) as locks, locks.hold(record, ttl=TTL, wait=30) as held:
        with open(out_dir / "attempts", "a") as fh:
            fh.write(f"started {owner} {held.lease.fence}\n")
        if mode == "hang":
            while True:
                time.sleep(0.05)
                held.check()
        time.sleep(0.3)                     # the work
        held.check()
        with open(out_dir / "done", "a") as fh:
            fh.write(f"done {owner} {held.lease.fence}\n")


if __name__ == "__main__":
    main(*sys.argv[1:6])
