"""The mypyc-compiled core (balancer/native.py): built for the sources in the
tree, every parsing and framing unit test (the raw vectors too) passes on it, and
a balancer worker on each engine runs it, keeps requests apart and refuses a
smuggling attempt. Skipped where mypy or a C compiler is missing. The build is
kept in BERTH_NATIVE_DIR (default ~/.cache/berth/balancer-native), one per
fingerprint of the sources, so later runs reuse it."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from balancer import native
from tests.integration.test_balancer import (  # noqa: F401  (fixtures)
    BalancerProc, Client, Publisher, _bounded, backends, engine, get, publisher, tmp,
    wait_routed,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build():
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if importlib.util.find_spec("mypyc") is None or shutil.which("cc") is None \
            or not headers.exists():
        pytest.skip("building the native core needs mypy, a C compiler and Python.h")
    return native.build()     # about 35 s the first time


def test_unit_tests_pass_on_the_compiled_core(build):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/balancer"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "BERTH_TEST_NATIVE": "1"}, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_a_worker_runs_the_compiled_core(build, tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, native="true", **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        assert "native=True" in bal.stderr.read_text()
        c = Client(bal.port)
        try:           # keep-alive, a body, then a CL+TE smuggling attempt
            c.send(b"GET /one HTTP/1.1\r\nHost: alpha.localhost\r\n\r\n")
            assert c.response()[0] == 200
            c.send(b"POST /echo HTTP/1.1\r\nHost: alpha.localhost\r\n"
                   b"Content-Length: 5\r\n\r\nhello")
            assert c.response()[0] == 200
            c.send(b"POST / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: 4\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
                   b"Host: alpha.localhost\r\n\r\n")
            assert c.response()[0] == 400
            assert c.closed()
        finally:
            c.close()
        assert "GET /smuggled" not in backends["alpha"].requests()
    finally:
        assert bal.stop() == 0


def test_a_worker_told_not_to_runs_pure_python(build, tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, native="false", **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        assert "native=False" in bal.stderr.read_text()
        assert get(bal.port, "alpha.localhost")[0] == 200
    finally:
        assert bal.stop() == 0


def test_a_build_for_other_sources_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTH_NATIVE_DIR", str(tmp_path))
    stale = tmp_path / "0123456789abcdef0123" / "balancer"       # another fingerprint
    stale.mkdir(parents=True)
    for name in native.MODULES:
        (stale / f"{name}{native.SUFFIX}").write_bytes(b"")
    assert not native.built() and native.build_dir().parent == tmp_path
