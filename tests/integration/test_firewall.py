"""Firewall against the real kernel (needs root and nft). Each test works on its own
table (berth_t<hex>), deleted at the end, and a real app user made by AppUsers, whose
connections are tried from a subprocess run as that user with setpriv."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.firewall import Firewall
from runner.users import AppUser, AppUsers

NOBODY = 65534
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("setpriv") is None,
    reason="needs root, nft and setpriv")

CONNECT = """\
import errno, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("CONNECTED")
except socket.timeout:
    print("TIMEOUT")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""

UDP_SEND = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    print("SENT")
except OSError as exc:
    print("REFUSED", exc.errno)
"""

SERVE_ONCE = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(10)
conn, _ = s.accept()
conn.sendall(b"hello from the app")
conn.close()
"""

# a uid range of its own: a platform started by another test installs the real
# `inet berth` table for 200000-299999, which would refuse these users too
TEST_RANGE = (300000, 300999)


@pytest.fixture
def firewall() -> Iterator[Firewall]:
    table = f"berth_t{secrets.token_hex(4)}"
    fw = Firewall(*TEST_RANGE, table=table)
    try:
        yield fw
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
        assert table not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                           text=True, check=True).stdout


@pytest.fixture
def app_user(tmp_path: Path) -> Iterator[AppUser]:
    users = AppUsers(secrets.token_hex(2), *TEST_RANGE)
    try:
        yield users.ensure("fwtest", tmp_path / "home")
    finally:
        users.remove("fwtest")


def _listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = _listener()
    try:
        yield sock
    finally:
        sock.close()


def _as(uid: int, gid: int, code: str, *args: object) -> str:
    """Run `code` with python3 as uid:gid; its one line of output."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            PYTHON, "-c", code, *map(str, args)]
    result = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30,
                            cwd="/")
    return result.stdout.strip()


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_app_is_refused_until_the_port_is_allowed(firewall: Firewall, app_user: AppUser,
                                                 listener: socket.socket) -> None:
    port = _port(listener)
    assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.1", port) == "CONNECTED"

    firewall.ensure()
    assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.1", port) == "ECONNREFUSED"
    assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.2", port) == "ECONNREFUSED"

    firewall.allow(port)
    assert firewall.allowed() == {port}
    assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.1", port) == "CONNECTED"

    firewall.disallow(port)
    assert firewall.allowed() == set()
    assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.1", port) == "ECONNREFUSED"


def test_ipv6_loopback_is_refused_too(firewall: Firewall, app_user: AppUser) -> None:
    try:
        sock = _listener("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        firewall.ensure()
        assert _as(app_user.uid, app_user.gid, CONNECT, "::1", _port(sock)) == \
            "ECONNREFUSED"
        firewall.allow(_port(sock))
        assert _as(app_user.uid, app_user.gid, CONNECT, "::1", _port(sock)) == "CONNECTED"


def test_root_and_users_outside_the_range_connect(firewall: Firewall,
                                                  listener: socket.socket) -> None:
    firewall.ensure()
    port = _port(listener)
    assert _as(0, 0, CONNECT, "127.0.0.1", port) == "CONNECTED"
    assert _as(NOBODY, NOBODY, CONNECT, "127.0.0.1", port) == "CONNECTED"
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        pass


def test_the_balancer_still_reaches_an_app_listening_on_loopback(
        firewall: Firewall, app_user: AppUser) -> None:
    """The app's own answers to a loopback client leave from sockets it owns: only
    connections the app opens are refused."""
    firewall.ensure()
    argv = ["setpriv", f"--reuid={app_user.uid}", f"--regid={app_user.gid}",
            "--clear-groups", PYTHON, "-c", SERVE_ONCE]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(100) == b"hello from the app"
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_udp_to_loopback_is_dropped_except_dns(firewall: Firewall,
                                               app_user: AppUser) -> None:
    firewall.ensure()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(1)
        sent = _as(app_user.uid, app_user.gid, UDP_SEND, "127.0.0.1", _port(sink))
        assert sent.startswith("REFUSED")      # the kernel drops it: EPERM
        with pytest.raises(TimeoutError):
            sink.recvfrom(100)
        assert _as(NOBODY, NOBODY, UDP_SEND, "127.0.0.1", _port(sink)) == "SENT"
        assert sink.recvfrom(100)[0] == b"ping"
    assert "udp dport != 53 reject" in firewall.rules()


def test_dns_on_loopback_stays_reachable(firewall: Firewall, app_user: AppUser) -> None:
    firewall.ensure()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        try:
            udp.bind(("127.0.0.9", 53))
            tcp.bind(("127.0.0.9", 53))
        except OSError:
            pytest.skip("port 53 on 127.0.0.9 is taken")
        tcp.listen(4)
        udp.settimeout(3)
        assert _as(app_user.uid, app_user.gid, UDP_SEND, "127.0.0.9", 53) == "SENT"
        assert udp.recvfrom(100)[0] == b"ping"
        assert _as(app_user.uid, app_user.gid, CONNECT, "127.0.0.9", 53) == "CONNECTED"


def _rule_lines(firewall: Firewall) -> list[str]:
    return [line.strip() for line in firewall.rules().splitlines() if "reject" in line]


def test_ensure_twice_leaves_one_copy_of_each_rule(firewall: Firewall) -> None:
    firewall.ensure()
    once = _rule_lines(firewall)
    assert len(once) == 4 and len(set(once)) == 4
    firewall.allow(5432)
    firewall.ensure()
    assert _rule_lines(firewall) == once
    assert firewall.allowed() == {5432}     # ensure keeps the allowed ports
    assert firewall.rules().count("chain output") == 1


def test_concurrent_ensures_leave_one_copy(firewall: Firewall) -> None:
    """Runners starting together: each nft script is one kernel transaction."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(3):
                Firewall(*TEST_RANGE, table=firewall.table).ensure()
        except BaseException as exc:   # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    lines = _rule_lines(firewall)
    assert len(lines) == 4 and len(set(lines)) == 4


def test_allowed_set_bookkeeping(firewall: Firewall) -> None:
    assert firewall.allowed() == set()      # no table yet
    firewall.disallow(6379)                 # not allowed: fine
    firewall.allow(6379)
    firewall.allow(6379)
    firewall.allow(11211)
    assert firewall.allowed() == {6379, 11211}
    firewall.disallow(6379)
    assert firewall.allowed() == {11211}


def test_available() -> None:
    assert Firewall(200000, 299999).available() == (True, "")
