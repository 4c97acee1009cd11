"""Many starts at once never starve the runner's heartbeat: spawning (fork/exec into
the jail) runs in a bounded pool off the loop, and the loop sends its heartbeat before
working through the rest of a burst of events. A real runner against the stand-in
controller of test_runner.py; the gaps are measured on the heartbeats' own timestamps
(when the runner made them)."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from tests.integration.test_runner import (
    FakeController,
    RunnerProcess,
    SlugServer,
    kill_leftovers,
    make_slug,
)

INSTANCES = 30
INTERVAL = 0.3              # the runner's heartbeat interval in this test
START_TIMEOUT = 180.0

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


def test_thirty_starts_keep_the_heartbeat_on_time(tmp_path: Path, venv_cache: Path,
                                                  apps_dir: Path) -> None:
    ctl = FakeController()
    slugs = SlugServer({SHA: SLUG})
    runner = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir,
                           heartbeat_interval=INTERVAL, max_parallel_spawns=2,
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
        # the heartbeats the runner made from the last one before the burst on
        made = sorted(m.ts for m in ctl.heartbeats)
        made = [t for t in made if t >= since - INTERVAL * 1.5]
        gaps = [b - a for a, b in zip(made, made[1:], strict=False)]
        assert gaps, made
        print(f"{INSTANCES} instances RUNNING in {took:.1f}s; {len(made)} heartbeats, "
              f"longest gap {max(gaps):.3f}s ({max(gaps) / INTERVAL:.2f} intervals)")
        assert max(gaps) <= 2 * INTERVAL, (
            f"a heartbeat came {max(gaps):.3f}s after the one before (interval "
            f"{INTERVAL}s) while {INSTANCES} instances started")
        assert all(i["restarts"] == 0 for i in ctl.inventory()), ctl.inventory()
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
