"""Desired state in, commands and routes out.

`plan` is pure: it compares what the store wants (release, formation) with what the
runners report in their heartbeats (plus starts already sent but not yet reported)
and says what to start, drain and stop, and what each app's route is. The daemon
runs it in a loop; running it twice on the same input gives the same plan, so a
lost message is repaired by the next pass.

Deploys are "preboot": instances of the new release start beside the old ones, and
the old ones are drained only once as many new ones are RUNNING (health-checked) as
the formation asks for. A release that cannot start leaves the old one serving.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from messaging.shapes import LIVE, Backend, HostReport, InventoryItem, Route, State

RELEASE_PHASE = "release"   # a Procfile entry that runs once per release, never scaled


@dataclass
class StartSpec:
    host: str
    instance: str
    app: str
    release: Any          # store.Release
    proc: str


@dataclass
class Plan:
    starts: list[StartSpec] = field(default_factory=list)
    drains: list[str] = field(default_factory=list)
    stops: list[tuple[str, str]] = field(default_factory=list)   # (host, instance)
    routes: dict[str, Route] = field(default_factory=dict)
    unplaced: list[tuple[str, str]] = field(default_factory=list)   # no host has room


def new_instance_id() -> str:
    return uuid.uuid4().hex[:10]


def flatten(observed: dict[str, HostReport],
            pending: dict[str, InventoryItem]) -> list[InventoryItem]:
    """Every instance on every live host, plus sent-but-unreported starts (PENDING)."""
    out = [inst for report in observed.values() for inst in report.inventory]
    seen = {inst.instance for inst in out}
    out += [p for iid, p in pending.items() if iid not in seen]
    return out


def _reason(app: str, release: Any, formation: dict[str, int], insts: list[InventoryItem],
            hosts: int) -> str:
    if release is None or not release.slug:
        return f"app '{app}' has no release yet; deploy it with `berth push`"
    if formation.get("web", 0) == 0:
        return f"no web process is running; scale it up with `berth scale web=1 -a {app}`"
    if hosts == 0:
        return "no runner host is available to run the app; the operator has been told"
    web = [i for i in insts if i.web]
    if web and all(i.state is State.FATAL for i in web):
        return (f"the app crashed on start (release v{release.version}); "
                f"see `berth logs -a {app}`")
    return f"the app is starting (release v{release.version}); try again in a few seconds"


def static_part(app: str, serving: list[InventoryItem],
                observed: dict[str, HostReport]) -> dict[str, Any]:
    """The static fields of an app's route (shapes.Route): the static file servers of
    the hosts that hold the collected files of the newest release with a serving
    instance, that release's URL prefix (what its build's collectstatic found, as the
    runners report it), and every serving release, newest first, for files that only
    an older page still asks for while a deploy rolls. None when no host holds them:
    the instances then answer those requests themselves (Django's stopgap)."""
    versions = sorted({i.release for i in serving}, reverse=True)
    if not versions:
        return {}
    newest = versions[0]
    holders = sorted(h for h, r in observed.items() if r.static_port and r.address
                     and newest in r.static_roots.get(app, {}))
    if not holders:
        return {}
    prefix = observed[holders[0]].static_roots[app][newest]
    static = tuple(Backend(f"static@{h}", observed[h].address or "",
                           observed[h].static_port or 0) for h in holders
                   if observed[h].static_roots[app][newest] == prefix)
    return {"static_prefix": prefix, "static_backends": static,
            "static_releases": tuple(versions)}


def memory_mb(want: dict[str, Any] | None, report: HostReport | None) -> int:
    """What one instance of an app may use (its limit): the app's own setting, its
    berth.yaml's, else the host's default."""
    release = want.get("release") if want else None
    own = (want or {}).get("memory_mb") or (release.manifest.memory_mb if release else None)
    return int(own or (report.default_memory_mb if report else 0))


def plan(desired: dict[str, dict[str, Any]], observed: dict[str, HostReport],
         pending: dict[str, InventoryItem], draining: dict[str, float],
         stopping: set[str], now: float, drain_seconds: float,
         base_domain: str, default_max_body: int = 100 << 20,
         draining_hosts: frozenset[str] | set[str] = frozenset(),
         stale: frozenset[str] | set[str] = frozenset()) -> Plan:
    """`draining_hosts`: hosts being emptied (`berth hosts drain`): nothing new goes
    there, and what runs there is replaced elsewhere first, then retired, as in a
    deploy. `stale`: instances of a host that was lost and came back (a partition
    healed): their places were filled elsewhere, so they are never routed and are
    stopped (the generation fence)."""
    result = Plan()
    every = [i for i in flatten(observed, pending)
             if i.state is not State.STOPPING and i.instance not in stopping]
    for i in every:
        if i.instance in stale and i.state is not State.PENDING:
            result.stops.append((i.host, i.instance))
    insts = [i for i in every if i.instance not in stale]
    load = {host: 0 for host, report in observed.items()
            if report.runs_apps and host not in draining_hosts}
    used = dict.fromkeys(load, 0)
    spread: dict[tuple[str, str, str], int] = {}        # (host, app, proc) -> count
    for i in insts:
        if i.host in load:
            load[i.host] += 1
            used[i.host] += memory_mb(desired.get(i.app), observed.get(i.host))
            spread[(i.host, i.app, i.proc)] = spread.get((i.host, i.app, i.proc), 0) + 1

    def place(app: str, proc: str) -> str | None:
        """The host for one more instance: one with room for its memory limit, with
        the fewest of this process type (spread: never all on one host when more
        can take them), then the fewest instances."""
        room = [h for h in sorted(load) if not observed[h].capacity_mb or
                used[h] + memory_mb(desired.get(app), observed[h]) <= observed[h].capacity_mb]
        if not room:
            return None
        host = min(room, key=lambda h: (spread.get((h, app, proc), 0), load[h]))
        load[host] += 1
        used[host] += memory_mb(desired.get(app), observed[host])
        spread[(host, app, proc)] = spread.get((host, app, proc), 0) + 1
        return host

    def retire(inst: InventoryItem) -> None:
        if inst.instance in draining:
            return
        if inst.web and inst.state is State.RUNNING:
            result.drains.append(inst.instance)
        elif inst.state is not State.PENDING:
            result.stops.append((inst.host, inst.instance))

    by_app: dict[str, list[InventoryItem]] = {}
    for i in insts:
        by_app.setdefault(i.app, []).append(i)

    for app, want in desired.items():
        release = want["release"]
        mine = [i for i in by_app.get(app, []) if i.instance not in draining]
        wanted = {}
        if release is not None and release.slug:
            wanted = {p: n for p, n in want["formation"].items()
                      if p in release.procfile and p != RELEASE_PHASE}
        for proc in sorted(set(wanted) | {i.proc for i in mine}):
            n = wanted.get(proc, 0)
            cur = [i for i in mine if i.proc == proc and release
                   and i.release == release.version and i.state in LIVE
                   and i.host not in draining_hosts]
            old = [i for i in mine if i.proc == proc and i not in cur]
            missing = n - len(cur)
            for _ in range(max(0, missing)):
                host = place(app, proc)
                if host is None:
                    result.unplaced.append((app, proc))
                    break
                result.starts.append(StartSpec(host, new_instance_id(), app, release, proc))
            if missing < 0:
                # what goes first: not serving yet, then from the host with the most
                # of this process type (the spread stays), then the newest
                per_host = {h: sum(1 for i in cur if i.host == h) for h in {i.host for i in cur}}
                extras = sorted(cur, key=lambda i: (i.state is State.RUNNING,
                                                    -per_host[i.host], -i.since))
                for inst in extras[:-missing]:
                    retire(inst)
            ready = sum(1 for i in cur if i.state is State.RUNNING)
            if ready >= n:
                for inst in old:
                    retire(inst)
        serving = [i for i in mine if i.web and i.state is State.RUNNING and i.port
                   and i.address and i.instance not in result.drains]
        backends = sorted((Backend(i.instance, i.address or "", i.port or 0) for i in serving),
                          key=lambda b: b.id)
        reason = ""
        if not backends:
            current = [i for i in mine if release and i.release == release.version]
            reason = _reason(app, release, want["formation"], current, len(load))
            if (app, "web") in result.unplaced and load:
                reason = (f"no host has the memory for another instance of {app}; the "
                          "operator has been told (`berth hosts` shows what is free)")
        result.routes[app] = Route(
            hosts=(f"{app}.{base_domain}", *want["domains"]),
            backends=tuple(backends),
            reason=reason,
            maintenance=bool(want.get("maintenance")),
            max_body=(want["max_body_mb"] << 20 if want.get("max_body_mb")
                      else default_max_body),
            **static_part(app, serving, observed))

    for app, gone in by_app.items():
        if app not in desired:
            for inst in gone:
                retire(inst)

    for iid, since in draining.items():
        if now - since >= drain_seconds:
            where = next((i.host for i in insts if i.instance == iid), None)
            if where is not None:
                result.stops.append((where, iid))
    return result


def draining_view(insts: list[InventoryItem], draining: dict[str, float]) -> list[InventoryItem]:
    """The instances as `berth ps` shows them: drained ones as DRAINING."""
    return [replace(i, state=State.DRAINING) if i.instance in draining else i for i in insts]
