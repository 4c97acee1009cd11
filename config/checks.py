"""Checks shared by the settings modules: pass one as `Setting(..., check=...)`.

Each takes the converted value and raises `Invalid(problem, hint)` (the problem
reads after "setting X from SOURCE"); `rule` is what `berth settings` shows.
`endpoint()` declares a channel's endpoint setting with the channel's own default
(messaging/channels.py), so no settings module writes an endpoint by hand.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from config.declare import Invalid, Setting, describe_check
from messaging.channels import CHANNELS

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\s]+):(\d+|\*)$")


@describe_check("> 0")
def positive(value: Any) -> None:
    if value <= 0:
        raise Invalid("must be greater than 0", "give a positive number")


@describe_check("tcp://HOST:PORT or ipc://PATH")
def zmq_endpoint(value: str) -> None:
    """A ZeroMQ endpoint between processes: tcp://HOST:PORT or ipc://PATH."""
    hint = "write tcp://HOST:PORT (e.g. tcp://127.0.0.1:8701) or ipc:///path/to/socket"
    if value.startswith("ipc://"):
        if len(value) == len("ipc://"):
            raise Invalid("names no socket path", hint)
        return
    match = _TCP.match(value)
    if not match:
        raise Invalid("is not a tcp:// or ipc:// endpoint", hint)
    port = match.group(2)
    if port != "*" and not 1 <= int(port) <= 65535:
        raise Invalid(f"has port {port}, outside 1..65535", hint)


@describe_check("http(s)://HOST[:PORT] or empty")
def http_url_or_empty(value: str) -> None:
    if value:
        http_url(value)


@describe_check("http(s)://HOST[:PORT]")
def http_url(value: str) -> None:
    hint = "write a URL such as http://127.0.0.1:8700"
    if not re.match(r"^https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d+)?(/\S*)?$", value):
        raise Invalid("is not an http:// URL", hint)


@describe_check("redis://[:PASSWORD@]HOST:PORT[/DB] or empty")
def redis_url_or_empty(value: str) -> None:
    if value and not re.match(r"^rediss?://([^@/\s]*@)?[^/\s:@]+(:\d+)?(/\d*)?$", value):
        raise Invalid("is not a redis:// URL",
                      "write a URL such as redis://:PASSWORD@127.0.0.1:8720/0")


@describe_check("a loopback address")
def loopback(value: str) -> None:
    try:
        ok = value == "localhost" or ipaddress.ip_address(value).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise Invalid("is not a loopback address",
                      "use 127.0.0.1 (or another 127.x address, or ::1)")


@describe_check("addresses or CIDRs")
def networks(value: list[str]) -> None:
    for entry in value:
        try:
            ipaddress.ip_network(str(entry).strip(), strict=False)
        except ValueError as exc:
            raise Invalid(f"has {entry!r}, which is not an address or CIDR ({exc})",
                          "list addresses or CIDRs such as 10.0.0.0/8") from exc


@describe_check("low-high, two ports")
def port_range(value: str) -> None:
    low, _, high = value.partition("-")
    if not (low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) <= 65535):
        raise Invalid(f"is {value!r}, not a range of ports", "write it as low-high, e.g. "
                      "20000-32000 (between 1024 and 65535)")


@describe_check("a postgresql:// URL or empty")
def postgres_url_or_empty(value: str) -> None:
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise Invalid(f"is {value!r}, not a postgresql:// URL",
                      "give postgresql://user@host:port/db (or leave it empty for SQLite)")


@describe_check("one or more of app, db")
def host_roles(value: list[str]) -> None:
    roles = [str(v).strip() for v in value]
    unknown = [r for r in roles if r not in ("app", "db")]
    if unknown or not roles:
        raise Invalid(f"has {', '.join(map(repr, unknown)) or 'no role'}",
                      "list app, db or both (app: instances, runs and builds; db: addon "
                      "database servers)")


@describe_check("not empty")
def not_empty(value: str) -> None:
    if not value.strip():
        raise Invalid("is empty", "give it a value")


def heartbeat_settings(dead_means: str) -> list[Setting]:
    """heartbeat_interval and dead_after, with the defaults messaging/heartbeat.py
    declares once; `dead_means` says what a silent peer is taken as."""
    from messaging.heartbeat import DEAD_AFTER, INTERVAL
    return [Setting("heartbeat_interval", float, INTERVAL, "Seconds between heartbeats.",
                    check=positive),
            Setting("dead_after", int, DEAD_AFTER,
                    f"Silent heartbeat intervals before {dead_means}.", min=1)]


def endpoint(channel: str, help: str) -> Setting:
    """The setting holding `channel`'s endpoint, defaulting to the channel's own."""
    ch = CHANNELS[channel]
    return Setting(ch.endpoint_setting, str, ch.default_endpoint, help, check=zmq_endpoint)


@describe_check("e.g. 24h 7d 4w 12m min=3")
def retention_policy(value: str) -> None:
    """A backup retention policy (backup/retention.py)."""
    from backup.errors import InvalidPolicy
    from backup.retention import Policy
    try:
        Policy.parse(value)
    except InvalidPolicy as exc:
        raise Invalid(exc.message, exc.hint) from None


@describe_check("VOLUME-PATTERN=POLICY, ...")
def volume_policies(value: list[str]) -> None:
    """Per-volume retention policies: `pattern=policy` items."""
    for item in value:
        pattern, sep, policy = str(item).partition("=")
        if not sep or not pattern.strip():
            raise Invalid(f"item {item!r} is not VOLUME-PATTERN=POLICY",
                          "e.g. 'addon-*=48h 14d 8w min=5' (shell patterns: * ? [...])")
        retention_policy(policy.strip())
