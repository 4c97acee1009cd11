"""Placement of addon servers on runners (controller/services.py) and the service
spec on the wire: pure functions over heartbeats, no processes (the runner side is
tests/integration/test_runner_services.py, the whole platform
tests/integration/test_addon_hosts.py)."""
from __future__ import annotations

from typing import Any

import pytest

from controller import services
from messaging.errors import ProtocolError
from messaging.shapes import HostReport, InventoryItem, ServiceSpec, State


def spec(sid: str, address: str) -> ServiceSpec:
    return ServiceSpec(id=sid, addon="pg-1", app="shop", kind="postgres",
                       argv=("/usr/lib/postgresql/15/bin/postgres", "-D", "/d"), cwd="/d",
                       user="postgres", address=address, port=5500, stop_signal="INT")


def report(host: str, address: str, *served: tuple[str, State]) -> HostReport:
    return HostReport(host, address, services=[
        InventoryItem(instance=sid, app="shop", release=0, proc="postgres", state=state,
                      host=host) for sid, state in served])


def test_a_server_goes_to_the_runner_of_its_address():
    observed = {"db-a": report("db-a", "127.0.0.2"), "db-b": report("db-b", "127.0.0.3")}
    p = services.plan([spec("n-a", "127.0.0.2"), spec("n-b", "127.0.0.3")], observed, {}, 0)
    assert [(h, s.id) for h, s in p.serves] == [("db-a", "n-a"), ("db-b", "n-b")]


def test_without_a_runner_there_the_least_loaded_takes_it_unless_one_was_lost():
    observed = {"r1": report("r1", "127.0.0.1", ("other", State.RUNNING)),
                "r2": report("r2", "127.0.0.5")}
    p = services.plan([spec("n-a", "127.0.0.2")], observed, {}, 0)
    assert [(h, s.id) for h, s in p.serves] == [("r2", "n-a")]
    # its host's runner was lost: its data is there, so it waits for that host
    p = services.plan([spec("n-a", "127.0.0.2")], observed, {}, 0, lost={"127.0.0.2"})
    assert not p.serves and [s.id for s in p.unplaced] == ["n-a"]
    assert services.plan([spec("n-a", "127.0.0.2")], {}, {}, 0).unplaced


def test_served_ones_stay_serves_are_not_repeated_and_unwanted_ones_stop():
    observed = {"db-a": report("db-a", "127.0.0.2", ("n-a", State.BACKOFF),
                               ("fenced", State.RUNNING), ("going", State.STOPPING))}
    p = services.plan([spec("n-a", "127.0.0.2"), spec("n-b", "127.0.0.2")], observed,
                      {"n-b": 100.0}, now=105.0)
    assert p.serves == []                       # n-a is there; n-b was sent 5 s ago
    assert p.unserves == [("db-a", "fenced")]   # "going" is stopping already
    p = services.plan([spec("n-b", "127.0.0.2")], observed, {"n-b": 100.0},
                      now=100.0 + services.SERVE_RETRY)
    assert [s.id for _, s in p.serves] == ["n-b"]


@pytest.mark.parametrize("change,why", [
    ({"argv": []}, "argv"), ({"argv": ["postgres"]}, "absolute"),
    ({"kind": "mysql"}, "unknown service kind"), ({"port": 0}, "not a port"),
    ({"stop_signal": "KILL"}, "stop_signal"), ({"user": ""}, "user"),
])
def test_a_malformed_service_spec_says_what_is_wrong(change: dict[str, Any], why: str):
    wire = {**spec("n-a", "127.0.0.2").to_wire(), **change}
    with pytest.raises(ProtocolError) as err:
        ServiceSpec.from_wire(wire)
    assert why in str(err.value)


def test_a_service_spec_round_trips_and_tolerates_new_fields():
    s = spec("n-a", "127.0.0.2")
    assert ServiceSpec.from_wire({**s.to_wire(), "newer": 1}) == s
