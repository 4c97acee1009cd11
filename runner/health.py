"""The web health check: any HTTP answer below 500 means the instance can take traffic."""
from __future__ import annotations

import http.client
import time
from collections.abc import Callable

POLL_SECONDS = 0.2


def answers(address: str, port: int, host_header: str, timeout: float = 2.0,
            path: str = "/") -> bool:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host_header, "User-Agent": "berth-runner"})
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_healthy(address: str, port: int, host_header: str, timeout: float,
                 wanted: Callable[[], bool], path: str = "/") -> bool:
    """Poll `path` (the app manifest's healthcheck) every 0.2 s until an answer below
    500 (True), or until `timeout` passes or `wanted()` turns False (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and wanted():
        if answers(address, port, host_header, path=path):
            return True
        time.sleep(POLL_SECONDS)
    return False
