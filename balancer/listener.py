"""The listening side, without eventlet: settings checks made at start, the
SO_REUSEPORT listening socket and the open-files limit. Used by the master
(which binds) and by the workers (which may bind when run alone)."""
from __future__ import annotations

import ipaddress
import resource
import socket

from balancer import http1
from config import SettingsError


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SettingsError(f"balancer.listen_host {host!r} is not a loopback address",
                            "listen on 127.0.0.1 (or another 127.x address)")


def check_trusted(entries: list[str]) -> http1.TrustedProxies:
    try:
        return http1.TrustedProxies(entries)
    except ValueError as exc:
        raise SettingsError(f"balancer.trusted_proxies: {exc}",
                            "list addresses or CIDRs such as 10.0.0.0/8") from exc


def raise_open_files(wanted: int = 0) -> int:
    """Lift the soft RLIMIT_NOFILE to `wanted` (0: the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted <= 0 or hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(target, soft)


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A plain listening socket with SO_REUSEPORT, so that workers (and a second
    balancer overlapping a restart) can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock
