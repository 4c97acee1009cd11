"""The walking skeleton, end to end: real controller, runner (on 127.0.0.2),
balancer, gunicorn and virtualenvs, driven through the real `berth` CLI."""
from __future__ import annotations

import os
import queue
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
        # past the drain of the old instance: until only v2 is listed, and a few
        # more requests after that
        berth.wait_for(lambda: [i["release"] for i in berth.json(
            "ps", "-a", "steady")["instances"]] == [2], what="only v2 left")
        served = len(results)
        berth.wait_for(lambda: len(results) >= served + 20, what="20 more requests")
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


def test_logs_show_app_router_and_platform_lines_and_follow(berth, tmp_path):
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT
    app = copy_example(tmp_path / "chatty")
    berth("apps", "create", "chatty")
    berth("push", str(app), "-a", "chatty")
    assert berth.get("chatty", "/env/BERTH_APP").status == 200

    def has_all():
        out = berth("logs", "-a", "chatty").stdout
        return ("app[web." in out and "Listening at: http://127.0.0.2:" in out
                and "router[router]:" in out and "path=/env/BERTH_APP" in out
                and "berth[platform]:" in out) and out
    out = berth.wait_for(has_all, what="app, router and platform lines")
    assert "status=200" in out
    follow = subprocess.Popen([sys.executable, "-m", "cli.main", "logs", "-f", "-n", "0",
                               "-a", "chatty"], cwd=ROOT, env=berth.env,
                              stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert follow.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(x) for x in follow.stdout],
                              daemon=True)
    reader.start()
    try:
        # the follower subscribes in its own time: ask again until a request shows
        deadline = time.monotonic() + 30
        line = ""
        while "/followed-path" not in line:
            assert time.monotonic() < deadline, "no followed line in 30 s"
            berth.get("chatty", "/followed-path")
            try:
                while "/followed-path" not in line:
                    line = lines.get(timeout=1)
            except queue.Empty:
                pass
        assert "status=404" in line
    finally:
        follow.kill()
        follow.wait(10)
        reader.join(10)
    # another app's logs never show this app's lines
    berth("apps", "create", "quiet")
    assert "chatty" not in berth("logs", "-a", "quiet").stdout
    assert "/followed-path" not in berth("logs", "-a", "quiet").stdout


def test_custom_domain_routes_to_the_app(berth, tmp_path):
    from tests.e2e.conftest import request
    app = copy_example(tmp_path / "branded")
    berth("apps", "create", "branded")
    berth("push", str(app), "-a", "branded")
    berth("domains", "add", "www.branded.example", "-a", "branded")
    port = berth.platform.ports.balancer
    r = berth.wait_for(lambda: (lambda r: r.status == 200 and r)(
        request(port, "www.branded.example")), what="custom domain routed")
    assert "app branded" in r.text
    assert "www.branded.example" in berth("domains", "-a", "branded").stdout
    berth("domains", "remove", "www.branded.example", "-a", "branded")
    berth.wait_for(lambda: request(port, "www.branded.example").status == 404,
                   what="domain removed")


def test_destroy_stops_instances_and_unroutes(berth, tmp_path):
    app = copy_example(tmp_path / "doomed")
    berth("apps", "create", "doomed")
    berth("push", str(app), "-a", "doomed")
    pid = running(berth, "doomed")[0]["pid"]
    refused = berth("apps", "destroy", "doomed", "--confirm", "wrong", check=False)
    assert refused.returncode != 0
    assert berth.get("doomed").status == 200
    berth("apps", "destroy", "doomed", "--confirm", "doomed")
    berth.wait_for(lambda: berth.get("doomed").status == 404, what="unrouted")
    assert "doomed" not in berth("apps", "list").stdout

    def gone():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    berth.wait_for(gone, what="instance stopped")
