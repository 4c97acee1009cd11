"""Host -> app index over the replicated route table, without I/O.

Route table (from the controller, via messaging.clone): {app: route} where
route = {"hosts": [...], "backends": [{"id", "address", "port"}], "reason": str,
"maintenance": bool, "max_body": int (bytes; 0 or absent = no limit)}.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


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
    backends: list[dict[str, Any]]
    reason: str
    maintenance: bool = False
    max_body: int = 0


class RouteIndex:
    """Rebuilt whole on every table change; lookups are one dict access."""

    def __init__(self, table: dict[str, dict[str, Any]] | None = None) -> None:
        self.hosts: dict[str, str] = {}
        self.table: dict[str, dict[str, Any]] = {}
        self.update(table or {})
        self.loaded = table is not None   # a table has arrived (else every host is unknown)

    def update(self, table: dict[str, dict[str, Any]]) -> None:
        hosts: dict[str, str] = {}
        for app in sorted(table):
            route = table[app] or {}
            for host in route.get("hosts") or []:
                key = normalize_host(str(host))
                if key in hosts and hosts[key] != app:
                    log.warning("host claimed by two apps; keeping the first",
                                extra={"host_name": key, "app": hosts[key],
                                       "other_app": app})
                    continue
                hosts[key] = app
        self.hosts, self.table = hosts, table
        self.loaded = True

    def lookup(self, host: str) -> Match | None:
        app = self.hosts.get(normalize_host(host))
        if app is None:
            return None
        route = self.table.get(app) or {}
        try:
            max_body = max(0, int(route.get("max_body") or 0))
        except (TypeError, ValueError):
            max_body = 0
        return Match(app, list(route.get("backends") or []),
                     str(route.get("reason") or ""),
                     maintenance=bool(route.get("maintenance")), max_body=max_body)
