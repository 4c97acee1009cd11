"""The locks channel against a real controller process, over real ZeroMQ sockets:
leases are exclusive, renewed, released; a holder killed with SIGKILL mid-work loses
its lease to the watchdog once the TTL runs out, and the work is retried once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from messaging.errors import LeaseBusy, LeaseLost
from messaging.locks import LeaseEvents, LockClient
from messaging.shapes import Lease
from tests.integration.controllerproc import ROOT, ControllerProc, running_controller
from tests.integration.lockworker import TTL

RECORD = "app/demo/record/42"
STEP = 15.0                 # the longest any one step below may take


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[ControllerProc]:
    with running_controller(tmp_path / "platform") as c:
        yield c


def test_leases_are_exclusive_renewed_and_released(ctl: ControllerProc) -> None:
    with LockClient(ctl.locks_endpoint, "a") as a, LockClient(ctl.locks_endpoint, "b") as b:
        lease = a.acquire("deploy/x", ttl=5)
        assert lease.owner == "a" and lease.fence >= 1 and 0 < lease.expires_in <= 5
        with pytest.raises(LeaseBusy, match="held by a"):
            b.acquire("deploy/x", ttl=5)
        renewed = a.renew(lease, ttl=10)
        assert renewed.fence == lease.fence and renewed.expires_in > 5
        with pytest.raises(LeaseLost):
            b.release(Lease("deploy/x", "b", lease.fence, 5))
        a.release(renewed)
        again = b.acquire("deploy/x", ttl=5)
        assert again.fence == lease.fence + 1          # fences only grow
        with pytest.raises(LeaseLost):
            a.renew(renewed)                           # a's grant is over
        with pytest.raises(Exception, match="invalid lease name"):
            a.acquire("../nope", ttl=5)
        with pytest.raises(Exception, match="ttl"):
            a.acquire("deploy/y", ttl=10**6)


def _next_event(events: LeaseEvents, timeout: float) -> tuple[str, Lease]:
    got = events.next(timeout)
    assert got is not None, f"no lease event within {timeout}s"
    return got


def _worker(ctl: ControllerProc, out: Path, mode: str, owner: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.lockworker",
                             ctl.locks_endpoint, RECORD, str(out), mode, owner],
                            cwd=ROOT, env=env, start_new_session=True)


def _wait(what: str, check, timeout: float = STEP):   # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_holder_killed_mid_work_loses_its_lease_and_the_work_is_retried_once(
        ctl: ControllerProc, tmp_path: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    sub = LeaseEvents(ctl.lock_events_endpoint)
    time.sleep(0.3)                                     # the slow joiner
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first = _worker(ctl, out, "hang", "worker-a")
        procs.append(first)
        _wait("worker-a to start its work", lambda: (out / "attempts").exists())
        event, granted = _next_event(sub, STEP)
        assert (event, granted.owner) == ("acquired", "worker-a")
        time.sleep(2 * TTL)                     # renewals keep it past its first TTL
        with LockClient(ctl.locks_endpoint, "thief") as thief, pytest.raises(LeaseBusy):
            thief.acquire(RECORD, ttl=1)

        os.kill(first.pid, signal.SIGKILL)      # mid-work, no goodbye
        killed_at = time.monotonic()
        first.wait(5)
        retries = 0
        while True:                             # the retrier: redo work whose lease expired
            event, lease = _next_event(sub, STEP)
            if event == "expired":
                freed_after = time.monotonic() - killed_at
                assert lease.owner == "worker-a" and lease.fence == granted.fence
                retries += 1
                procs.append(_worker(ctl, out, "finish", "worker-b"))
            elif event == "released":
                break
            else:
                assert (event, lease.owner) == ("acquired", "worker-b")
                assert lease.fence == granted.fence + 1
        assert procs[-1].wait(STEP) == 0
        assert retries == 1
        # freed by the watchdog once the TTL ran out after the last renewal, not before
        assert TTL * 0.5 <= freed_after <= TTL + 1.0, freed_after
        attempts = (out / "attempts").read_text().splitlines()
        assert [a.split()[:2] for a in attempts] == [["started", "worker-a"],
                                                    ["started", "worker-b"]]
        assert (out / "done").read_text().splitlines() == [f"done worker-b {granted.fence + 1}"]
        print(f"\nlease freed {freed_after:.2f}s after SIGKILL of its holder (ttl {TTL}s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        sub.close()


def test_leases_survive_a_controller_restart(tmp_path: Path) -> None:
    ctl = ControllerProc(tmp_path / "platform")
    try:
        ctl.start()
        with LockClient(ctl.locks_endpoint, "a") as a:
            lease = a.acquire("backup/vol1", ttl=2)
        ctl.stop()
        ctl.start()
        with LockClient(ctl.locks_endpoint, "b", timeout=5) as b:
            with pytest.raises(LeaseBusy):
                b.acquire("backup/vol1", ttl=2)   # a gets a TTL from the restart to renew
            again = b.acquire("backup/vol1", ttl=2, wait=STEP)
            assert again.fence == lease.fence + 1
    finally:
        ctl.stop()
