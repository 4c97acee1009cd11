from controller.reconciler import plan
from controller.store import Release
from messaging.shapes import HostReport, InventoryItem, State


def rel(version, procfile=None):
    return Release("app", version, "s" * 64, procfile or {"web": "gunicorn app:app"}, {}, "", 0)


def inst(iid, release, state="RUNNING", proc="web", port=5000, host="r1"):
    return InventoryItem(instance=iid, app="app", release=release, proc=proc,
                         state=State(state), address="127.0.0.2", port=port, since=1.0,
                         host=host)


def report(host, inventory, address="127.0.0.2"):
    return HostReport(host, address, inventory)


def desired(version, web=1, procfile=None):
    return {"app": {"release": rel(version, procfile), "formation": {"web": web}, "domains": []}}


def run(d, inventory, draining=None, now=100.0, pending=None):
    observed = {"r1": report("r1", inventory)}
    return plan(d, observed, pending or {}, draining or {}, set(), now, 2.0, "localhost")


def test_starts_missing_instances_on_least_loaded_host():
    p = plan(desired(1, web=2), {"r1": report("r1", [inst("x", 1)]), "r2": report("r2", [])},
             {}, {}, set(), 0, 2.0, "localhost")
    assert [(s.host, s.proc) for s in p.starts] == [("r2", "web")]


def test_pending_starts_are_not_repeated():
    p = run(desired(1), [], pending={"p1": inst("p1", 1, state="PENDING", port=None)})
    assert p.starts == []


def test_old_release_kept_until_new_one_runs():
    p = run(desired(2), [inst("old", 1), inst("new", 2, state="STARTING", port=None)])
    assert p.drains == [] and p.stops == []
    assert [b.id for b in p.routes["app"].backends] == ["old"]


def test_old_release_drained_then_stopped_once_new_runs():
    p = run(desired(2), [inst("old", 1), inst("new", 2, port=6000)])
    assert p.drains == ["old"]
    assert [b.id for b in p.routes["app"].backends] == ["new"]
    p = run(desired(2), [inst("old", 1), inst("new", 2, port=6000)],
            draining={"old": 99.0}, now=100.0)
    assert p.stops == []
    p = run(desired(2), [inst("old", 1), inst("new", 2, port=6000)],
            draining={"old": 97.0}, now=100.0)
    assert p.stops == [("r1", "old")]


def test_crashed_new_release_keeps_old_serving_with_no_churn():
    p = run(desired(2), [inst("old", 1), inst("bad", 2, state="FATAL", port=None)])
    assert p.starts == [] and p.drains == [] and p.stops == []
    assert [b.id for b in p.routes["app"].backends] == ["old"]


def test_scale_down_stops_extras_and_zero_explains():
    p = run(desired(1, web=0), [inst("a", 1)])
    assert p.drains == ["a"]
    assert "scale web=1" in p.routes["app"].reason


def test_destroyed_app_is_removed():
    p = plan({}, {"r1": report("r1", [inst("a", 1, state="STARTING")])}, {}, {}, set(), 0, 2.0,
             "localhost")
    assert p.stops == [("r1", "a")] and p.routes == {}


def test_routes_name_hosts_and_reasons():
    d = {"app": {"release": None, "formation": {"web": 1}, "domains": ["www.example.com"]}}
    p = run(d, [])
    assert p.routes["app"].hosts == ("app.localhost", "www.example.com")
    assert "berth push" in p.routes["app"].reason


def test_no_runner_means_no_start_and_a_reason():
    p = plan(desired(1), {}, {}, {}, set(), 0, 2.0, "localhost")
    assert p.starts == [] and "no runner" in p.routes["app"].reason


def test_worker_procs_are_started_but_not_routed():
    d = desired(1, procfile={"web": "gunicorn app:app", "worker": "python w.py"})
    d["app"]["formation"]["worker"] = 1
    p = run(d, [inst("w", 1, proc="web")])
    assert [s.proc for s in p.starts] == ["worker"]


def test_routes_carry_maintenance_and_body_limit():
    d = desired(1)
    d["app"].update(maintenance=True, max_body_mb=5)
    route = run(d, [inst("a", 1)]).routes["app"]
    assert route.maintenance is True and route.max_body == 5 << 20
    d["app"].update(maintenance=False, max_body_mb=None)
    assert run(d, [inst("a", 1)]).routes["app"].max_body == 100 << 20


def test_the_release_phase_is_never_started_as_a_process():
    d = desired(1, procfile={"web": "gunicorn app:app", "release": "python migrate.py"})
    d["app"]["formation"]["release"] = 1          # even if an old store says so
    p = run(d, [inst("w", 1)])
    assert p.starts == []


def static_host(host, inventory, roots, port=7001, address="127.0.0.2"):
    return HostReport(host, address, inventory, static_port=port, static_roots=roots)


def static_of(route):
    return route.static_prefix, [(b.address, b.port) for b in route.static_backends], \
        route.static_releases


def test_static_goes_to_the_hosts_holding_the_serving_release():
    observed = {"r1": static_host("r1", [inst("a", 3)], {"app": {3: "/static/"}}),
                "r2": static_host("r2", [], {"app": {2: "/static/"}}, address="127.0.0.3"),
                "r3": static_host("r3", [], {"app": {3: "/static/"}}, address="127.0.0.4")}
    route = plan(desired(3), observed, {}, {}, set(), 0, 2.0, "localhost").routes["app"]
    assert static_of(route) == ("/static/", [("127.0.0.2", 7001), ("127.0.0.4", 7001)], (3,))


def test_no_static_without_a_holder_a_port_or_a_serving_instance():
    def route_for(r1, version=3, inventory=None):
        inv = [inst("a", 3)] if inventory is None else inventory
        observed = {"r1": static_host("r1", inv, **r1)}
        return plan(desired(version), observed, {}, {}, set(), 0, 2.0,
                    "localhost").routes["app"]
    assert not route_for({"roots": {}}).serves_static               # not a Django app
    assert not route_for({"roots": {"app": {3: "/s/"}}, "port": None}).serves_static
    assert not route_for({"roots": {"app": {2: "/s/"}}}).serves_static   # another release
    starting = [inst("a", 3, state="STARTING", port=None)]
    assert not route_for({"roots": {"app": {3: "/s/"}}}, inventory=starting).serves_static
    assert route_for({"roots": {"app": {3: "/s/"}}}).serves_static


def test_static_during_a_deploy_serves_the_newest_release_and_falls_back_to_older():
    # v2 already running beside v1 (not all of the formation yet): both serve pages
    roots = {"app": {1: "/static/", 2: "/static/"}}
    observed = {"r1": static_host("r1", [inst("old", 1), inst("new", 2, port=6000)], roots)}
    route = plan(desired(2, web=2), observed, {}, {}, set(), 0, 2.0,
                 "localhost").routes["app"]
    assert static_of(route) == ("/static/", [("127.0.0.2", 7001)], (2, 1))
    # once v2 alone serves, v1 is drained and its files are no longer asked for
    route = plan(desired(2), observed, {}, {}, set(), 0, 2.0, "localhost").routes["app"]
    assert route.static_releases == (2,)


def test_instances_of_a_process_type_spread_over_hosts():
    # r1 is less loaded overall, but already runs this app's web: the next goes to r2
    other = [InventoryItem(instance=f"o{i}", app="other", release=1, proc="web",
                           state=State.RUNNING, host="r2") for i in range(3)]
    observed = {"r1": report("r1", [inst("a", 1)]), "r2": report("r2", other)}
    p = plan(desired(1, web=2), observed, {}, {}, set(), 0, 2.0, "localhost")
    assert [s.host for s in p.starts] == ["r2"]
    # four at once on two hosts: two each, never all on one
    observed = {"r1": report("r1", []), "r2": report("r2", [])}
    p = plan(desired(1, web=4), observed, {}, {}, set(), 0, 2.0, "localhost")
    assert sorted(s.host for s in p.starts) == ["r1", "r1", "r2", "r2"]


def test_capacity_bounds_placement_and_the_route_says_why():
    def host(name, capacity, items):
        return HostReport(name, "127.0.0.2", items, capacity_mb=capacity,
                          default_memory_mb=256)
    observed = {"r1": host("r1", 512, [inst("a", 1), inst("b", 1, port=5001)]),
                "r2": host("r2", 600, [])}
    p = plan(desired(1, web=5), observed, {}, {}, set(), 0, 2.0, "localhost")
    assert [s.host for s in p.starts] == ["r2", "r2"]      # 2 x 256 fit in 600, not 3
    assert p.unplaced == [("app", "web")]
    d = desired(1, web=1)
    d["app"]["memory_mb"] = 1024                            # the app's own limit
    p = plan(d, {"r1": host("r1", 512, [])}, {}, {}, set(), 0, 2.0, "localhost")
    assert p.starts == [] and "no host has the memory" in p.routes["app"].reason


def test_a_drained_host_is_emptied_after_its_replacements_run():
    observed = {"r1": report("r1", [inst("a", 1)]), "r2": report("r2", [])}
    p = plan(desired(1), observed, {}, {}, set(), 0, 2.0, "localhost",
             draining_hosts={"r1"})
    assert [s.host for s in p.starts] == ["r2"] and p.drains == []
    assert [b.id for b in p.routes["app"].backends] == ["a"]     # still serving
    observed["r2"] = report("r2", [inst("n", 1, host="r2", port=6000)])
    p = plan(desired(1), observed, {}, {}, set(), 0, 2.0, "localhost",
             draining_hosts={"r1"})
    assert p.starts == [] and p.drains == ["a"]
    assert [b.id for b in p.routes["app"].backends] == ["n"]


def test_a_lost_hosts_instances_are_fenced_when_it_comes_back():
    # r1 was lost, its web replaced on r2; r1 returns still running "old"
    observed = {"r1": report("r1", [inst("old", 1)]),
                "r2": report("r2", [inst("new", 1, host="r2", port=6000)])}
    p = plan(desired(1), observed, {}, {}, set(), 0, 2.0, "localhost", stale={"old"})
    assert p.stops == [("r1", "old")] and p.starts == [] and p.drains == []
    assert [b.id for b in p.routes["app"].backends] == ["new"]   # never both


def test_scaling_down_keeps_the_spread():
    # runner r1 has two, r2 one (the newest): scaling to 2 retires one of r1's
    observed = {"r1": report("r1", [inst("a", 1), inst("b", 1, port=5001)]),
                "r2": report("r2", [InventoryItem(instance="c", app="app", release=1,
                                                  proc="web", state=State.RUNNING,
                                                  address="127.0.0.3", port=5002,
                                                  since=9.0, host="r2")])}
    p = plan(desired(1, web=2), observed, {}, {}, set(), 0, 2.0, "localhost")
    assert len(p.drains) == 1 and p.drains[0] in ("a", "b")
