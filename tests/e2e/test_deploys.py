"""One deploy per app at a time: each build holds the lease deploy/<app> (the locks
channel) from its dispatch to its release, so two pushes of one app overlap never,
and the second says what it waits for."""
from __future__ import annotations

import subprocess
import sys
import time

from messaging.locks import LeaseEvents
from tests.e2e.conftest import ROOT, copy_example

SLOW_RELEASE = "release: sleep 3\nweb: gunicorn app:app\n"


def test_two_pushes_of_one_app_deploy_one_after_the_other(berth, tmp_path):
    berth("apps", "create", "serial")
    app = copy_example(tmp_path / "serial")
    (app / "Procfile").write_text(SLOW_RELEASE)
    sub = LeaseEvents(f"tcp://127.0.0.1:{berth.platform.ports.lock_events}")
    time.sleep(0.3)
    try:
        pushes = [subprocess.Popen([sys.executable, "-m", "cli.main", "push", str(app), "-a",
                                    "serial"], cwd=ROOT, env=berth.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                  for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in pushes]
        assert [p.returncode for p in pushes] == [0, 0], outs
        events = []
        while (got := sub.next(1.0)) is not None:
            event, lease = got
            if lease.name == "deploy/serial":
                events.append((event, lease.owner, lease.fence))
    finally:
        sub.close()
    # acquired, released, acquired, released: never two holders at once
    assert [e[0] for e in events] == ["acquired", "released"] * 2, events
    assert events[0][1:] == events[1][1:] and events[2][1:] == events[3][1:]
    assert events[2][2] > events[0][2]                      # a newer fence
    waited = [o for o in outs if "Waiting for" in o[0] + o[1]]
    assert len(waited) == 1 and "one deploy of serial at a time" in waited[0][0] + waited[0][1]
    releases = berth.json("releases", "-a", "serial")
    assert sorted(r["version"] for r in releases["releases"])[-2:] == [1, 2], releases
