"""Route replication converges (late balancers, dropped updates) and `berth up`'s
platform resumes its apps after a restart."""
from __future__ import annotations

import json
import time
import urllib.request

import zmq

from cli.localplatform import free_port
from messaging import channels, curve, envelope
from messaging.clone import CloneReplica
from tests.e2e.conftest import EXAMPLE, request, start_platform


def controller_routes(platform):
    req = urllib.request.Request(platform.api_url + "/v1/routes",
                                 headers={"Authorization": f"Bearer {platform.admin_token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_replica_that_drops_updates_converges_to_the_controller(berth):
    """A replica fed by the real controller drops every other update on purpose;
    the gap (or the next tick) makes it ask for a snapshot, and it ends equal."""
    p = berth.platform
    ctx = zmq.Context()
    curve.init(p.keys_dir, ["replica-test"])    # an admitted host's key: CURVE is on
    curve.use(curve.load(p.keys_dir, "replica-test"))
    sub = channels.connect(ctx, "routes", f"tcp://127.0.0.1:{p.ports.routes}")
    snap = channels.connect(ctx, "routes_snapshot", f"tcp://127.0.0.1:{p.ports.snapshot}")
    replica = CloneReplica()
    dropped = 0
    try:
        for i in range(6):
            berth("apps", "create", f"drop{i}")
            berth("domains", "add", f"www.drop{i}.example.com", "-a", f"drop{i}")
        deadline = time.monotonic() + 20
        received = 0
        more_made = False
        while time.monotonic() < deadline:
            if replica.needs_snapshot:
                envelope.send(snap, envelope.make("snapshot_request", "test"))
                if snap.poll(2000):
                    replica.load(envelope.recv(snap)[1])
                    if not more_made:
                        more_made = True
                        for i in range(6, 10):      # changes after the first snapshot
                            berth("apps", "create", f"drop{i}")
            if sub.poll(200):
                _, msg = envelope.recv(sub)
                if msg.type == "route_update":
                    received += 1
                    if received % 2 == 0:
                        dropped += 1
                        continue
                replica.apply(msg)
            truth = controller_routes(p)
            if (not replica.needs_snapshot and replica.seq == truth["seq"]
                    and replica.table == truth["routes"] and received >= 4):
                break
        truth = controller_routes(p)
        assert dropped >= 2 and replica.gaps >= 1
        assert replica.table == truth["routes"] and replica.seq == truth["seq"]
        assert "www.drop3.example.com" in replica.table["drop3"]["hosts"]
    finally:
        curve.use(None)
        ctx.destroy(0)


def test_balancer_started_late_serves_the_same_routes(berth):
    berth("apps", "create", "late")
    berth("push", str(EXAMPLE), "-a", "late")
    port = free_port()
    berth.platform.start_balancer("balancer-late", port)
    try:
        r = berth.wait_for(lambda: (lambda r: r.status == 200 and r)(
            request(port, "late.localhost")), what="late balancer routes")
        assert "Hello from Berth!" in r.text
        missing = request(port, "nobody.localhost")
        assert missing.status == 404 and "nobody.localhost" in missing.text
    finally:
        berth.platform.stop_one("balancer-late")


def test_platform_resumes_apps_after_restart(tmp_path, venv_cache, apps_dir):
    from tests.e2e.conftest import Berth
    data = tmp_path / "data"
    platform = start_platform(data, venv_cache, apps_dir)
    try:
        b = Berth(platform, tmp_path / "cfg")
        b("apps", "create", "keeper")
        b("push", str(EXAMPLE), "-a", "keeper")
        b("config", "set", "GREETING=still-here", "-a", "keeper")
        b.wait_for(lambda: "still-here" in b.get("keeper").text, what="config applied")
    finally:
        platform.stop()
    assert platform.procs == {}
    again = start_platform(data, venv_cache, apps_dir)
    try:
        b = Berth(again, tmp_path / "cfg")
        r = b.wait_for(lambda: (lambda r: r.status == 200 and r)(b.get("keeper")),
                       what="resumed app")
        assert "still-here from Berth!" in r.text
        assert "v2 (current)" in b("releases", "-a", "keeper").stdout
    finally:
        again.stop()
