"""What operators see: the stats stream forwarded by the controller, and every host's
inventory; per-app limits and maintenance set through the CLI."""
from __future__ import annotations

import json
import time
import urllib.request

import zmq

from messaging import channels, curve, envelope
from tests.e2e.conftest import EXAMPLE


def test_stats_are_forwarded_and_summed_per_app(berth):
    """Two publishers speaking the real protocol on the real controller's stats
    channel (standing in for two balancers); an operator's SUB on stats_out gets them
    and the API sums them per app."""
    p = berth.platform
    ctx = zmq.Context()
    curve.init(p.keys_dir, ["operator"])        # an admitted host's key: CURVE is on
    curve.use(curve.load(p.keys_dir, "operator"))
    try:
        sub = channels.connect(ctx, "stats_out", f"tcp://127.0.0.1:{p.ports.stats_out}")
        pubs = [channels.connect(ctx, "stats", f"tcp://127.0.0.1:{p.ports.stats}")
                for _ in range(2)]
        figures = {"requests": 10, "status": {"2xx": 9, "5xx": 1}, "bytes_in": 100,
                   "bytes_out": 1000, "p50_ms": 2.0, "p95_ms": 4.0, "p99_ms": 8.0, "open": 1}
        got, current = None, {"hosts": []}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:      # PUBs drop what they send before joining
            for n, pub in enumerate(pubs):
                envelope.send(pub, envelope.make("stats", f"lb-{n}", host=f"lb-{n}",
                                                 interval=1.0, kind="balancer",
                                                 apps={"statsapp": figures}))
            if sub.poll(300):
                got = envelope.recv(sub)[1]
            current = json.loads(berth("stats", "--all", "--json").stdout)
            if got is not None and {"lb-0", "lb-1"} <= set(current["hosts"]):
                break
        assert got is not None and got.type == "stats" and got["apps"]["statsapp"] == figures
        assert {"lb-0", "lb-1"} <= set(current["hosts"])
        total = current["apps"]["statsapp"]
        assert total["requests"] == 20 and total["status"] == {"2xx": 18, "5xx": 2}
        assert total["p99_ms"] == 8.0 and total["sources"] == 2
    finally:
        curve.use(None)
        ctx.destroy(0)


def test_hosts_shows_what_every_runner_runs(berth):
    berth("apps", "create", "shown")
    berth("push", str(EXAMPLE), "-a", "shown")
    data = berth.json("hosts")
    inventory = data["runners"]["runner-1"]["inventory"]
    assert data["runners"]["runner-1"]["address"] == "127.0.0.2"
    assert any(i["app"] == "shown" and i["state"] == "RUNNING" for i in inventory)
    assert "=== runner-1 (127.0.0.2)" in berth("hosts").stdout


def test_limits_and_maintenance_through_the_cli(berth):
    berth("apps", "create", "limited")
    out = berth("limits", "-a", "limited").stdout
    assert "max body: 100 MB (platform default)" in out and "maintenance: off" in out
    out = berth("limits", "--max-body-mb", "5", "-a", "limited").stdout
    assert "max body: 5 MB (set for the app)" in out
    bad = berth("limits", "--max-body-mb", "0", "-a", "limited", check=False)
    assert bad.returncode != 0 and "1 to 10240 MB" in bad.stderr
    assert "is on" in berth("maintenance", "on", "-a", "limited").stdout

    def route():
        req = urllib.request.Request(berth.platform.api_url + "/v1/routes", headers={
            "Authorization": f"Bearer {berth.platform.admin_token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            r = json.loads(resp.read())["routes"]["limited"]
        return r["maintenance"] is True and r["max_body"] == 5 << 20
    berth.wait_for(route, what="route carries the limits")
    assert "is off" in berth("maintenance", "off", "-a", "limited").stdout


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


def test_followers_that_hang_up_free_their_threads(berth):
    import http.client
    p = berth.platform
    berth("apps", "create", "followed")
    pid = p.procs["controller"].pid
    before = _threads(pid)
    conns = []
    for path in ("/v1/apps/followed/logs?follow=1", "/v1/stats?follow=1") * 3:
        conn = http.client.HTTPConnection("127.0.0.1", p.ports.api, timeout=10)
        conn.request("GET", path, headers={"Authorization": f"Bearer {p.admin_token}"})
        assert conn.getresponse().status == 200
        conns.append(conn)
    assert _threads(pid) >= before + 6
    for conn in conns:
        conn.sock.close()
        conn.close()
    berth.wait_for(lambda: _threads(pid) <= before, timeout=15, what="threads freed")


def test_balancer_figures_reach_berth_stats(berth):
    """The real balancer counts an app's requests and publishes them; the controller
    forwards and sums them; `berth stats` shows them."""
    berth("apps", "create", "counted")
    berth("push", str(EXAMPLE), "-a", "counted")
    for _ in range(20):
        assert berth.get("counted").status == 200
    for _ in range(5):
        assert berth.get("counted", "/missing-page").status == 404

    def seen():
        # figures are per interval: keep a trickle going so a fresh interval counts too
        berth.get("counted")
        fig = json.loads(berth("stats", "-a", "counted", "--json").stdout)["apps"]
        return fig.get("counted", {}).get("requests", 0) > 0 and fig["counted"]
    fig = berth.wait_for(seen, what="balancer stats for the app")
    nonzero = {cls for cls, n in fig["status"].items() if n}
    assert nonzero <= {"2xx", "4xx"} and fig["status"]["2xx"] >= 1
    assert fig["p50_ms"] is not None and fig["bytes_out"] > 0
    other = json.loads(berth("stats", "--all", "--json").stdout)["apps"]
    assert "counted" in other

    def line():
        berth.get("counted")
        return "counted: req=" in berth("stats", "-a", "counted").stdout
    berth.wait_for(line, what="a human stats line")
