"""The typed wire shapes: each survives a round trip, tolerates fields a newer peer
adds, and refuses what it cannot use with a ProtocolError."""
from __future__ import annotations

import json

import pytest

from messaging.errors import ProtocolError
from messaging.shapes import (
    LIVE,
    Backend,
    HostReport,
    InventoryItem,
    Limits,
    Route,
    State,
    static_prefix_ok,
    static_roots_to_wire,
)


def test_route_round_trips_through_json():
    route = Route(("a.localhost", "www.example.com"), (Backend("i1", "127.0.0.2", 5000),),
                  "", True, 5 << 20)
    assert Route.from_wire(json.loads(json.dumps(route.to_wire()))) == route


def test_route_keeps_working_with_unknown_fields_and_refuses_bad_backends():
    wire = {"hosts": ["a"], "backends": [{"id": "i", "address": "127.0.0.2", "port": "81",
                                          "weight": 3}], "new_thing": 1, "max_body": "x"}
    route = Route.from_wire(wire)
    assert route.backends == (Backend("i", "127.0.0.2", 81),) and route.max_body == 0
    with pytest.raises(ProtocolError, match="port"):
        Route.from_wire({"hosts": [], "backends": [{"address": "127.0.0.2"}]})
    with pytest.raises(ProtocolError):
        Route.from_wire({"hosts": "a", "backends": []})


def test_inventory_item_round_trip_and_host_override():
    item = InventoryItem("i1", "app", 3, "web", State.RUNNING, "127.0.0.2", 5000,
                         restarts=2, pid=42, since=1.5, reason="ok", oom_kills=1)
    wire = json.loads(json.dumps(item.to_wire()))
    assert wire["state"] == "RUNNING"
    back = InventoryItem.from_wire({**wire, "extra": True}, host="r1")
    assert back.state is State.RUNNING and back.host == "r1" and back.web
    assert back.oom_kills == 1 and back.pid == 42


def test_inventory_item_refuses_unknown_states_and_missing_fields():
    with pytest.raises(ProtocolError, match="state"):
        InventoryItem.from_wire({"instance": "i", "app": "a", "release": 1, "proc": "web",
                                 "state": "DANCING"})
    with pytest.raises(ProtocolError, match="lacks"):
        InventoryItem.from_wire({"instance": "i", "state": "RUNNING"})


def test_live_states_are_the_ones_that_count_toward_a_formation():
    assert State.RUNNING in LIVE and State.FATAL in LIVE
    assert State.STOPPING not in LIVE and State.DRAINING not in LIVE


def test_limits_and_host_report():
    assert Limits.from_wire(None) == Limits()
    assert Limits.from_wire({"memory_mb": 64}).memory_mb == 64
    for bad in ({"memory_mb": 0}, {"pids_max": True}, {"pids_max": "5"}, [1]):
        with pytest.raises(ProtocolError):
            Limits.from_wire(bad)
    report = HostReport.from_heartbeat({"host": "r1", "interval": 1, "apps": ["a"],
                                        "inventory": [InventoryItem(
                                            "i", "a", 1, "web", State.STARTING).to_wire()]})
    assert report.inventory[0].host == "r1" and report.apps == ["a"]


def test_route_static_part_round_trips_and_is_optional():
    static = Backend("static@r1", "127.0.0.2", 7001)
    route = Route(("a.localhost",), (Backend("i1", "127.0.0.2", 5000),), "", False, 0,
                  "/static/", (static,), (4, 3))
    wire = json.loads(json.dumps(route.to_wire()))
    assert wire["static"] == {"prefix": "/static/", "backends": [static.to_wire()],
                              "releases": [4, 3]}
    assert Route.from_wire(wire) == route and route.serves_static
    # an older controller sends none; a route without static backends sends none
    assert "static" not in Route(("a",)).to_wire()
    assert "static" not in Route(("a",), static_prefix="/static/").to_wire()
    assert not Route.from_wire({"hosts": ["a"], "backends": []}).serves_static


@pytest.mark.parametrize("static", [
    "nonsense", {"prefix": "/", "backends": [{"address": "h", "port": 1}], "releases": [1]},
    {"prefix": "https://cdn.example/s/", "backends": [{"address": "h", "port": 1}],
     "releases": [1]},
    {"prefix": "/static", "backends": [{"address": "h", "port": 1}], "releases": [1]},
    {"prefix": "/s t/", "backends": [{"address": "h", "port": 1}], "releases": [1]},
    {"prefix": "/static/", "backends": [{"address": "h"}], "releases": [1]},
    {"prefix": "/static/", "backends": [{"address": "h", "port": 1}], "releases": ["1"]},
    {"prefix": "/static/", "backends": [], "releases": [1]},
])
def test_a_malformed_static_part_means_no_static_never_a_lost_route(static):
    route = Route.from_wire({"hosts": ["a"], "backends": [], "static": static})
    assert route.hosts == ("a",) and not route.serves_static


def test_static_prefixes():
    for good in ("/static/", "/assets/v1/", "/s%20x/"):
        assert static_prefix_ok(good), good
    for bad in ("", "/", "static/", "/static", "//cdn/", "/a b/", "/a\n/", "http://x/s/"):
        assert not static_prefix_ok(bad), bad


def test_host_report_static_server():
    wire = {"host": "r1", "interval": 1, "static_port": 7001,
            "static_roots": static_roots_to_wire({"shop": {4: "/static/", 12: "/s/"}})}
    assert json.loads(json.dumps(wire))["static_roots"] == {
        "shop": {"4": "/static/", "12": "/s/"}}
    report = HostReport.from_heartbeat(json.loads(json.dumps(wire)))
    assert report.static_port == 7001
    assert report.static_roots == {"shop": {4: "/static/", 12: "/s/"}}
    # older runners send neither; nonsense is left out entry by entry
    assert HostReport.from_heartbeat({"host": "r1"}).static_port is None
    odd = HostReport.from_heartbeat({"host": "r1", "static_port": 7001, "static_roots": {
        "a": {"x": "/static/", "2": "/", "3": "/ok/"}, "b": [1]}})
    assert odd.static_roots == {"a": {3: "/ok/"}}
    for port in (0, True, "7001", 70000):
        down = HostReport.from_heartbeat({"host": "r1", "static_port": port,
                                          "static_roots": {"a": {"1": "/static/"}}})
        assert down.static_port is None and down.static_roots == {}
