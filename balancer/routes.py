"""Host -> app index over the replicated route table, without I/O.

The route table (from the controller, via messaging.clone) maps each app to a route
on the wire; its shape is messaging.shapes.Route, parsed once per table change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from messaging.errors import ProtocolError
from messaging.shapes import Backend, Route

log: Final = logging.getLogger(__name__)


def normalize_host(host: str) -> str:
    """Lowercase, without the port and a trailing dot; IPv6 literals keep brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end >= 0 else host
    host = host.rsplit(":", 1)[0] if ":" in host else host
    return host.rstrip(".")


@dataclass(frozen=True)
class Match:
    app: str
    backends: tuple[Backend, ...]
    reason: str
    maintenance: bool = False
    max_body: int = 0
    # the platform serves the app's static files (admission.static_target): GET/HEAD
    # under static_prefix go to static_backends with `X-Berth-Static: static_header`
    static_prefix: str = ""
    static_backends: tuple[Backend, ...] = ()
    static_header: str = ""


def match_for(app: str, route: Route) -> Match:
    static = route.serves_static
    return Match(app, route.backends, route.reason, maintenance=route.maintenance,
                 max_body=route.max_body,
                 static_prefix=route.static_prefix if static else "",
                 static_backends=route.static_backends if static else (),
                 static_header=(f"{app} {route.static_prefix} "
                                f"{','.join(map(str, route.static_releases))}"
                                if static else ""))


class RouteIndex:
    """Rebuilt whole on every table change; lookups are one dict access."""

    def __init__(self, table: dict[str, Any] | None = None) -> None:
        self.hosts: dict[str, str] = {}
        self.routes: dict[str, Route] = {}
        self.matches: dict[str, Match] = {}
        self.update(table or {})
        self.loaded = table is not None   # a table has arrived (else every host is unknown)

    def update(self, table: dict[str, Any]) -> None:
        """Take a new wire table; a malformed route is logged and left out."""
        hosts: dict[str, str] = {}
        routes: dict[str, Route] = {}
        for app in sorted(table):
            try:
                route = routes[app] = Route.from_wire(table[app] or {})
            except ProtocolError as exc:
                log.warning("dropped a malformed route", extra={"app": app,
                                                                "error": exc.message})
                continue
            for host in route.hosts:
                key = normalize_host(host)
                if key in hosts and hosts[key] != app:
                    log.warning("host claimed by two apps; keeping the first",
                                extra={"host_name": key, "app": hosts[key],
                                       "other_app": app})
                    continue
                hosts[key] = app
        self.hosts, self.routes = hosts, routes
        self.matches = {app: match_for(app, route) for app, route in routes.items()}
        self.loaded = True

    def lookup(self, host: str) -> Match | None:
        app = self.hosts.get(normalize_host(host))
        return None if app is None else self.matches[app]
