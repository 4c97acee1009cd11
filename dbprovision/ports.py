"""Free TCP ports on a loopback address, for servers started with port 0."""
from __future__ import annotations

import socket


def free_port(address: str) -> int:
    """A port nobody listens on at `address` now. A server started on it may still lose
    a race with another; its start then fails and says so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def listening(address: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
