"""A process killed mid-deploy loses nothing: the push fails with a clear error, the
app's running release keeps its state, and the next push works."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, Berth, copy_example, start_platform


@pytest.fixture
def own_platform(tmp_path, venv_cache, apps_dir):
    p = start_platform(tmp_path / "data", venv_cache, apps_dir)
    yield p
    p.stop()


def test_runner_killed_mid_build(own_platform, tmp_path):
    b = Berth(own_platform, tmp_path / "cfg")
    b("apps", "create", "midway")
    app = copy_example(tmp_path / "midway")
    # requirements no other test uses, so this build really installs
    (app / "requirements.txt").write_text("flask>=3\ngunicorn>=23\nhttpbin\n")
    push = subprocess.Popen([sys.executable, "-m", "cli.main", "push", str(app), "-a", "midway"],
                            cwd=ROOT, env=b.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 120
        assert push.stdout is not None
        while time.monotonic() < deadline:
            line = push.stdout.readline()
            seen.append(line)
            if "Installing requirements.txt" in line or not line:
                break
        assert any("Installing requirements.txt" in s for s in seen), seen
        own_platform.procs["runner-1"].kill()          # the host dies mid-build
        own_platform.procs["runner-1"].wait(10)
        out, err = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait(10)
    assert push.returncode != 0
    assert "Error: the build failed: runner runner-1 stopped answering" in err
    assert "Hint: push again" in err
    assert b.json("releases", "-a", "midway")["releases"] == []
    # the host comes back; the half-built virtualenv is thrown away and rebuilt
    own_platform.start_runner("runner-1", "127.0.0.2")
    again = b("push", str(app), "-a", "midway", timeout=600)
    assert "Removing incomplete virtualenv" in again.stdout
    assert "Deployed midway v1" in again.stdout
    r = b.get("midway")
    assert r.status == 200 and "Hello from Berth!" in r.text
