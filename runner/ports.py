"""Free TCP ports on the host's own loopback address."""
from __future__ import annotations

import socket


def free_port(address: str) -> int:
    """A port nothing listens on right now at `address` (the OS picks it).

    The port is released before the app binds it, so another process could take it in
    between; the instance then fails its start and is restarted on a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])
