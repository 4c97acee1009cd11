"""The host's static file server as the runner runs it: runner/staticsup.py starts the
real `python -m runner.static` child (dropping to nobody), hands it release roots of a
temporary apps dir laid out as the runner's (owned by a stand-in app user, 0700 at
the app's dir), and the tests talk HTTP to it as the balancer does. Every process is
the supervisor's child and is stopped through it (by PID)."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from runner.staticsup import StaticSupervisor

APP_UID = 54321
NOBODY = 65534
BIG = (1 << 20) + 12345                 # past SMALL: sent with sendfile
HASHED = "admin/css/base.0123456789ab.css"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")


def release(apps: Path, sha: str, files: dict[str, bytes]) -> Path:
    static = apps / "shop" / "releases" / sha / ".berth" / "static"
    static.mkdir(parents=True)
    for name, data in files.items():
        (static / name).parent.mkdir(parents=True, exist_ok=True)
        (static / name).write_bytes(data)
    return static


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    apps = tmp_path_factory.mktemp("apps")
    v1 = release(apps, "a" * 64, {"old.css": b"old{}", "admin/css/base.css": b"v1{}"})
    v2 = release(apps, "b" * 64, {
        "admin/css/base.css": b"body{color:red}\n", HASHED: b"body{color:red}\n",
        "big.bin": bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256),
        "sub/index.html": b"<p>hi</p>"})
    os.symlink("/etc/passwd", v2 / "passwd.css")                    # planted by the app
    os.symlink(v1, v2 / "v1link")
    for path in [apps / "shop", *(apps / "shop").rglob("*")]:
        os.chown(path, APP_UID, APP_UID, follow_symlinks=False)
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    (apps / "shop").chmod(0o700)                # as the runner leaves an app's dir
    return apps, v1, v2


@pytest.fixture(scope="module")
def sup(tree):
    apps, v1, v2 = tree
    s = StaticSupervisor("127.0.0.1", 0, apps, (NOBODY, NOBODY))
    s.start(time.monotonic())
    assert s.want({("shop", 1): (v1, "/static/"), ("shop", 2): (v2, "/static/")})
    pump(s, lambda: s.up_port and not s.outbox)
    yield s
    proc = s.proc
    s.close()
    assert proc is None or proc.poll() is not None


def pump(s: StaticSupervisor, done, timeout: float = 10.0) -> None:
    """Step the supervisor as the runner's loop would until `done()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.step(time.monotonic())
        if done():
            return
        time.sleep(0.02)
    raise TimeoutError("supervisor did not get there")


def get(port: int, path: str, method: str = "GET", target: str | None = "shop /static/ 2",
        **headers: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if target is not None:
            headers["X-Berth-Static"] = target
        conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_served(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if get(port, "/static/admin/css/base.css")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("static server did not serve")


def test_serves_a_file_with_validators_and_caching(sup):
    wait_served(sup.port)
    status, h, body = get(sup.port, "/static/admin/css/base.css")
    assert status == 200 and body == b"body{color:red}\n"
    assert h["server"] == "berth-static" and h["content-type"] == "text/css; charset=utf-8"
    assert h["etag"].startswith('"') and h["last-modified"].endswith("GMT")
    assert h["cache-control"] == "public, max-age=60"
    status, h2, _ = get(sup.port, f"/static/{HASHED}?v=2")
    assert status == 200 and h2["cache-control"] == "public, max-age=31536000, immutable"
    assert h2["etag"] == h["etag"]          # same bytes, same tag (a content hash)


def test_conditional_get_head_and_range(sup):
    _, h, _ = get(sup.port, "/static/admin/css/base.css")
    status, h304, body = get(sup.port, "/static/admin/css/base.css",
                             If_None_Match=h["etag"])
    assert (status, body) == (304, b"") and h304["etag"] == h["etag"]
    assert get(sup.port, "/static/admin/css/base.css",
               If_Modified_Since=h["last-modified"])[0] == 304
    status, hh, body = get(sup.port, "/static/big.bin", "HEAD")
    assert (status, body, hh["content-length"]) == (200, b"", str(BIG))
    status, hr, body = get(sup.port, "/static/big.bin", Range="bytes=1000-1999")
    assert status == 206 and hr["content-range"] == f"bytes 1000-1999/{BIG}"
    assert body == (bytes(range(256)) * 8)[1000 % 256:][:1000]


def test_large_file_goes_out_whole(sup, tree):
    _, _, v2 = tree
    status, h, body = get(sup.port, "/static/big.bin")
    assert status == 200 and body == (v2 / "big.bin").read_bytes()
    assert get(sup.port, "/static/big.bin", If_None_Match=h["etag"])[0] == 304


@pytest.mark.parametrize("path", [
    "/static/passwd.css", "/static/v1link/old.css", "/static/../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/x", "/static/sub", "/static/sub/", "/static/", "/static/nope.css",
    "/other/admin/css/base.css"])
def test_nothing_outside_no_links_no_listings(sup, path):
    assert get(sup.port, path)[0] == 404


def test_older_releases_answer_what_the_newest_lacks(sup):
    assert get(sup.port, "/static/old.css")[0] == 404
    assert get(sup.port, "/static/old.css", target="shop /static/ 2,1")[2] == b"old{}"
    assert get(sup.port, "/static/admin/css/base.css", target="shop /static/ 1")[2] == b"v1{}"
    assert get(sup.port, "/static/admin/css/base.css", target="other /static/ 2")[0] == 404


def test_refuses_what_the_balancer_never_sends(sup):
    assert get(sup.port, "/static/admin/css/base.css", target=None)[0] == 400
    assert get(sup.port, "/static/admin/css/base.css", "POST")[0] == 405


def test_keep_alive_and_pipelining(sup):
    with socket.create_connection(("127.0.0.1", sup.port), timeout=5) as s:
        one = (b"GET /static/admin/css/base.css HTTP/1.1\r\nHost: x\r\n"
               b"X-Berth-Static: shop /static/ 2\r\n\r\n")
        s.sendall(one * 3)
        data = b""
        while data.count(b"body{color:red}") < 3:
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 3


def test_runs_as_nobody(sup):
    assert sup.proc is not None
    status = Path(f"/proc/{sup.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(NOBODY)}
    assert "CapEff:\t0000000000000000" in status


def test_restarted_on_the_same_port_with_its_roots_after_dying(sup):
    assert sup.proc is not None
    port, pid = sup.port, sup.proc.pid
    os.kill(pid, signal.SIGKILL)                            # its child, by PID
    pump(sup, lambda: sup.proc is None)
    assert sup.up_port is None
    # while none runs, a connection is closed at once rather than left waiting (the
    # runner's loop steps every 50 ms at most; a thread plays it here)
    stop = threading.Event()
    loop = threading.Thread(target=lambda: [
        sup.step(time.monotonic()) or time.sleep(0.02) for _ in iter(stop.is_set, True)])
    loop.start()
    try:
        started = time.monotonic()
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(port, "/static/admin/css/base.css")
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        loop.join()
    pump(sup, lambda: sup.up_port == port and sup.proc.pid != pid and not sup.outbox)
    wait_served(port)
    assert get(port, "/static/old.css", target="shop /static/ 2,1")[0] == 200


def test_dropped_roots_are_no_longer_served(sup, tree):
    _, v1, v2 = tree
    assert sup.want({("shop", 2): (v2, "/static/")})
    assert sup.served() == {"shop": {2: "/static/"}}
    pump(sup, lambda: not sup.outbox)
    deadline = time.monotonic() + 5
    while get(sup.port, "/static/old.css", target="shop /static/ 1")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not sup.want({("shop", 2): (v2, "/static/")})      # nothing changed
    # a release without collected files is simply not held
    assert not sup.want({("shop", 2): (v2, "/static/"),
                         ("shop", 3): (v2.parent.parent.parent / ("c" * 64), "/static/")})
