"""Free TCP ports on the host's own loopback address."""
from __future__ import annotations

import socket
import threading
import time

# A port handed out is not handed out again for this long: the kernel may offer a
# port it just released to the next bind, and an instance takes a second or more to
# bind the one it was given (200 instances starting at once drew the same port twice).
REUSE_AFTER = 120.0
_given: dict[tuple[str, int], float] = {}
_lock = threading.Lock()


def free_port(address: str) -> int:
    """A port nothing listens on right now at `address` (the OS picks it), and not
    given to another instance of this runner in the last REUSE_AFTER seconds.

    The port is released before the app binds it, so another process could take it in
    between; the instance then fails its start and is restarted on a new port.
    """
    now = time.monotonic()
    with _lock:
        for key in [k for k, at in _given.items() if now - at > REUSE_AFTER]:
            del _given[key]
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                port = int(sock.getsockname()[1])
            if (address, port) not in _given:
                break
        _given[(address, port)] = now
        return port
