"""One deploy per app at a time: each build holds the lease deploy/<app> (the locks
channel) from its dispatch to its release, so two pushes of one app overlap never,
and the second says what it waits for."""
from __future__ import annotations

import subprocess
import sys
import time

from messaging import curve
from messaging.locks import LeaseEvents
from tests.e2e.conftest import ROOT, copy_example

SLOW_RELEASE = "release: sleep 5\nweb: gunicorn app:app\n"


def test_two_pushes_of_one_app_deploy_one_after_the_other(berth, tmp_path):
    berth("apps", "create", "serial")
    app = copy_example(tmp_path / "serial")
    (app / "Procfile").write_text(SLOW_RELEASE)
    # a watcher of lease events is a peer like any other: admitted by its CURVE key
    keys_dir = berth.platform.keys_dir
    curve.init(keys_dir, ["deploys-watcher"])
    curve.use(curve.load(keys_dir, "deploys-watcher"))
    try:
        sub = LeaseEvents(f"tcp://127.0.0.1:{berth.platform.ports.lock_events}")
    finally:
        curve.use(None)
    time.sleep(0.3)

    def push() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "push", str(app), "-a",
                                 "serial"], cwd=ROOT, env=berth.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    events = []

    def note(timeout: float) -> bool:
        got = sub.next(timeout)
        if got is not None and got[1].name == "deploy/serial":
            events.append((got[0], got[1].owner, got[1].fence))
        return got is not None

    try:
        first = push()
        deadline = time.monotonic() + 120
        while not events:               # the first build holds the lease: push again
            assert time.monotonic() < deadline, "the first build never took its lease"
            note(1.0)
        second = push()
        outs = [p.communicate(timeout=300) for p in (first, second)]
        assert [p.returncode for p in (first, second)] == [0, 0], outs
        while note(1.0):
            pass
    finally:
        sub.close()
    # acquired, released, acquired, released: never two holders at once
    assert [e[0] for e in events] == ["acquired", "released"] * 2, events
    assert events[0][1:] == events[1][1:] and events[2][1:] == events[3][1:]
    assert events[2][2] > events[0][2]                      # a newer fence
    first_out, second_out = ("".join(o) for o in outs)
    assert "Waiting for" not in first_out
    assert f"Waiting for {events[0][1].removeprefix('build/')} to finish (one deploy of " \
           "serial at a time)" in second_out
    releases = berth.json("releases", "-a", "serial")
    assert sorted(r["version"] for r in releases["releases"])[-2:] == [1, 2], releases
