"""The walking skeleton, end to end: real controller, runner (on 127.0.0.2),
balancer, gunicorn and virtualenvs, driven through the real `berth` CLI."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

from tests.e2e.conftest import EXAMPLE, copy_example


def running(berth, app, release=None):
    insts = berth.json("ps", "-a", app)["instances"]
    return [i for i in insts if i["state"] == "RUNNING" and i["proc"] == "web"
            and (release is None or i["release"] == release)]


def test_push_example_is_served_through_the_balancer(berth):
    berth("apps", "create", "hello")
    out = berth("push", str(EXAMPLE), "-a", "hello")
    assert "-----> Build finished" in out.stdout
    # the runner's whole build log reaches the CLI before the controller's verdict
    venv_line = re.search(r"-----> (Virtualenv ready|Reusing virtualenv)", out.stdout)
    assert venv_line and venv_line.start() < out.stdout.index("Build finished")
    assert "-----> Deployed hello v1" in out.stdout
    assert f"http://hello.localhost:{berth.platform.ports.balancer}/" in out.stdout
    r = berth.get("hello")
    assert r.status == 200, r.text
    assert "Hello from Berth!" in r.text and "release v1" in r.text
    # the runner is its own simulated host: the instance listens on 127.0.0.2
    assert running(berth, "hello")[0]["address"] == "127.0.0.2"


def test_third_party_app_httpbin(berth, tmp_path):
    app = tmp_path / "httpbin"
    app.mkdir()
    (app / "requirements.txt").write_text("httpbin\ngunicorn\n")
    (app / "Procfile").write_text("web: gunicorn httpbin:app\n")
    berth("apps", "create", "bin")
    berth("push", str(app), "-a", "bin", timeout=600)
    r = berth.get("bin", "/get?x=1")
    assert r.status == 200, r.text
    import json
    body = json.loads(r.body)
    assert body["args"] == {"x": "1"}
    assert body["headers"]["Host"] == "bin.localhost"


def test_config_makes_a_release_and_rollback_returns(berth, tmp_path):
    app = copy_example(tmp_path / "cfg")
    berth("apps", "create", "cfg")
    berth("push", str(app), "-a", "cfg")
    out = berth("config", "set", "GREETING=hi", "-a", "cfg")
    assert "release v2" in out.stdout
    berth.wait_for(lambda: "hi from Berth!" in berth.get("cfg").text, what="GREETING=hi served")
    assert berth("config", "get", "GREETING", "-a", "cfg").stdout.strip() == "hi"
    releases = berth("releases", "-a", "cfg").stdout
    assert "v2 (current)" in releases and "Set GREETING" in releases and "Deploy" in releases
    out = berth("rollback", "-a", "cfg")
    assert "Rollback to v1" in out.stdout and "release v3" in out.stdout
    berth.wait_for(lambda: "Hello from Berth!" in berth.get("cfg").text, what="rollback served")
    assert "release v3" in berth.get("cfg").text
    assert "GREETING" not in berth("config", "get", "-a", "cfg").stdout


def test_redeploy_under_load_drops_no_request(berth, tmp_path):
    app = copy_example(tmp_path / "steady")
    berth("apps", "create", "steady")
    berth("push", str(app), "-a", "steady")
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client_loop() -> None:
        deadline = time.monotonic() + 60          # bounded even if the push hangs
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = berth.get("steady", timeout=10)
                results.append((r.status, r.text))
            except OSError as exc:
                results.append((0, repr(exc)))
            time.sleep(0.01)

    source = (app / "app.py").read_text().replace("from Berth!", "from Berth, redeployed!")
    (app / "app.py").write_text(source)
    loop = threading.Thread(target=client_loop)
    loop.start()
    try:
        berth("push", str(app), "-a", "steady")
        time.sleep(3)                             # past the drain of the old instance
    finally:
        stop.set()
        loop.join(30)
    failures = [r for r in results if r[0] != 200]
    assert len(results) > 50
    assert failures == [], failures[:5]
    assert "redeployed" in results[-1][1]
    assert any("redeployed" not in text for _, text in results[:5])
    assert [i["release"] for i in running(berth, "steady")] == [2]


def test_killed_gunicorn_master_is_restarted_and_routed(berth, tmp_path):
    app = copy_example(tmp_path / "phoenix")
    berth("apps", "create", "phoenix")
    berth("push", str(app), "-a", "phoenix")
    before = running(berth, "phoenix")[0]
    os.kill(before["pid"], signal.SIGKILL)

    def back():
        now = running(berth, "phoenix")
        return now and now[0]["restarts"] >= 1 and now[0]["port"] != before["port"] and now[0]
    after = berth.wait_for(back, what="restarted instance")
    assert after["instance"] == before["instance"]
    berth.wait_for(lambda: berth.get("phoenix").status == 200, what="route to new port")
    table = berth("ps", "-a", "phoenix").stdout
    assert before["instance"] in table and " 1 " in table


def test_scale_and_ps(berth, tmp_path):
    app = copy_example(tmp_path / "wide")
    berth("apps", "create", "wide")
    berth("push", str(app), "-a", "wide")
    berth("scale", "web=2", "-a", "wide")
    berth.wait_for(lambda: len(running(berth, "wide")) == 2, what="two instances")
    berth("scale", "web=0", "-a", "wide")
    berth.wait_for(lambda: berth.get("wide").status == 503, what="scaled to zero")
    r = berth.get("wide")
    assert "scale web=1" in r.text
