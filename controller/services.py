"""Which runner supervises which addon server, and the commands that make it so.

`plan` is pure, like the reconciler's: the servers the store wants (every ready
dedicated/ha addon's `ServiceSpec`s, as its job worker reported them) against what
the runners' heartbeats list under `services`, plus the serve commands sent lately.

Placement: a server belongs to the host whose runner listens on the server's address
(a PostgreSQL node on 127.0.0.2 is host 127.0.0.2's: the job worker chose that
address among the db hosts; an ha addon's PgBouncer listens on the job worker's own
host, whose runner takes it whatever its roles); when no runner has that address
(one runner for everything, as `berth up` starts), the runner with the db role and
the fewest servers takes it, unless a runner of that address was lost (the server's
data directory is on that host: it waits for the host). A server already reported
stays where it is. A server that
is not wanted any more (its addon is being destroyed, a node fenced by a failover)
is unserved wherever it is reported; a dead host's servers simply stop being
reported, and they are not started elsewhere: their data directory lives on that
host (failover to the standby is the ha plan's answer, controller/jobs.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from messaging.shapes import HostReport, ServiceSpec, State

SERVE_RETRY = 10.0      # seconds before a serve with no effect in heartbeats is re-sent


@dataclass
class ServicePlan:
    serves: list[tuple[str, ServiceSpec]] = field(default_factory=list)
    unserves: list[tuple[str, str]] = field(default_factory=list)     # (host, service id)
    unplaced: list[ServiceSpec] = field(default_factory=list)         # no live runner


def place(spec: ServiceSpec, observed: dict[str, HostReport],
          load: dict[str, int], lost: frozenset[str] | set[str] = frozenset()) -> str | None:
    for host in sorted(observed):
        if observed[host].address == spec.address:
            return host
    dbs = [h for h in sorted(load) if observed[h].runs_dbs]
    if not dbs or spec.address in lost:
        return None
    return min(dbs, key=lambda h: load[h])


def plan(wanted: list[ServiceSpec], observed: dict[str, HostReport],
         sent: dict[str, float], now: float,
         lost: frozenset[str] | set[str] = frozenset()) -> ServicePlan:
    result = ServicePlan()
    reported = {item.instance: (host, item) for host, report in observed.items()
                for item in report.services}
    load = {host: len(report.services) for host, report in observed.items()}
    wanted_ids = {spec.id for spec in wanted}
    for spec in wanted:
        if spec.id in reported and reported[spec.id][1].state is not State.STOPPING:
            continue
        if now - sent.get(spec.id, -SERVE_RETRY) < SERVE_RETRY:
            continue
        host = place(spec, observed, load, lost)
        if host is None:
            result.unplaced.append(spec)
            continue
        load[host] = load.get(host, 0) + 1
        result.serves.append((host, spec))
    for sid, (host, item) in sorted(reported.items()):
        if sid not in wanted_ids and item.state is not State.STOPPING:
            result.unserves.append((host, sid))
    return result
