"""Many starts at once never starve the runner's heartbeat: spawning (fork/exec into
the jail) runs in a bounded pool off the loop, the loop sends its heartbeat before
working through the rest of a burst of events, and the beat thread (runner/beat.py)
says "alive" every half interval whatever the loop is doing. A real runner, with the
shipped heartbeat interval, against the stand-in controller of test_runner.py, given
200 instances to start at once (what a runner restarted on a host of 200 instances
has to do); the gaps are measured on the messages' own timestamps (when the runner
made them)."""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from messaging import heartbeat
from tests.integration.test_runner import (
    FakeController,
    RunnerProcess,
    SlugServer,
    kill_leftovers,
    make_slug,
)

INSTANCES = 200
INTERVAL = heartbeat.INTERVAL       # as shipped
START_TIMEOUT = 240.0

# a stdlib web server that takes half a second to come up: all of them are STARTING
# together, each with its output readers and health check, while the others spawn
APP_PY = b"""\
import http.server, os, time

time.sleep(0.5)

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")

    def log_message(self, *args):
        pass

address, port = os.environ["GUNICORN_CMD_ARGS"].split()[1].rsplit(":", 1)
print("listening", flush=True)
http.server.HTTPServer((address, int(port)), Hello).serve_forever()
"""
SLUG = make_slug({"app.py": APP_PY, "requirements.txt": b"",
                  "Procfile": b"web: python app.py\n"})
SHA = hashlib.sha256(SLUG).hexdigest()


def start(ctl: FakeController, slugs: SlugServer, instance: str) -> str:
    return ctl.command("start", instance=instance, app="many", release=1, proc="web",
                       command="python app.py", env={}, slug=SHA,
                       slug_url=slugs.slug_url(SHA), host_header="many.localhost")


def states(ctl: FakeController) -> dict[str, str]:
    return {i["instance"]: i["state"] for i in ctl.inventory()}


def test_200_starts_leave_no_liveness_gap_over_one_interval(tmp_path: Path,
                                                            venv_cache: Path,
                                                            apps_dir: Path) -> None:
    ctl = FakeController()
    slugs = SlugServer({SHA: SLUG})
    runner = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir,
                           log_level="info")
    try:
        # all at once, before the release is unpacked and its venv built: every
        # prepare waits for that one build, then all of them reach the spawn pool at
        # the same moment (as after a runner restart or a deploy)
        ctl.wait_for("the runner to connect", lambda: ctl.heartbeats, START_TIMEOUT)
        since = time.time()
        ids = [f"many-{n}" for n in range(INSTANCES)]
        for iid in ids:
            start(ctl, slugs, iid)
        ctl.wait_for(f"{INSTANCES} instances RUNNING", lambda: all(
            states(ctl).get(iid) == "RUNNING" for iid in ids), START_TIMEOUT)
        took = time.time() - since
        ctl.pump(2 * INTERVAL)
        # what the runner made from just before the burst on: full heartbeats (the
        # loop's) and beats (the beat thread's); the controller counts both
        full = sorted(m.ts for m in ctl.heartbeats if m.ts >= since - INTERVAL)
        beats = [m for m in ctl.beats if m.ts >= since - INTERVAL]
        alive = sorted(full + [m.ts for m in beats])
        gaps = [b - a for a, b in zip(alive, alive[1:], strict=False)]
        full_gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
        assert gaps and full_gaps and beats, (full, beats)
        loop_age = max(m["loop_age"] for m in beats)
        print(f"{INSTANCES} instances RUNNING in {took:.1f}s; {len(full)} heartbeats and "
              f"{len(beats)} beats, longest gap {max(gaps):.3f}s "
              f"({max(gaps) / INTERVAL:.2f} intervals); between full heartbeats "
              f"{max(full_gaps):.3f}s; the loop at most {loop_age:.3f}s without a step")
        assert max(gaps) <= INTERVAL, (
            f"nothing said alive for {max(gaps):.3f}s (interval {INTERVAL}s) while "
            f"{INSTANCES} instances started")
        # every beat was one the controller counts: the loop never stalled that long
        assert loop_age < INTERVAL * heartbeat.DEAD_AFTER, loop_age
        restarted = [i for i in ctl.inventory() if i["restarts"] != 0]
        assert not restarted, (   # which ones, on what port, and what the runner said
            [(i["instance"], i["restarts"], i["port"]) for i in restarted],
            [line for line in runner.log_text().splitlines()
             if any(re.search(rf"\b{i['instance']}\b", line) for i in restarted)][-20:])
        assert len(ctl.inventory()) == INSTANCES
    finally:
        code = runner.terminate(60)
        if code != 0:
            kill_leftovers(ctl.pids)
            print(runner.log_text()[-5000:])
        runner.stderr.close()
        slugs.close()
        ctl.close()
    assert code == 0
