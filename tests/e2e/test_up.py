"""`berth up --detach` / `berth down`, as the README's first command uses them."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from cli.localplatform import free_port, port_in_use, port_range
from tests.e2e.conftest import ROOT, request


def free_block(size: int) -> int:
    """`size` free ports in a row, in this process's port range (never the kernel's
    ephemeral range, where an outgoing connection may take one before `berth up`
    binds it: that failed once as "port 50116 ... is already in use")."""
    low, high = port_range()
    for _ in range(200):
        base = random.randint(low, high - size)
        if not any(port_in_use("127.0.0.1", base + i) for i in range(size)):
            return base
    raise AssertionError("no block of free ports")


def test_up_detached_then_down_stops_everything(tmp_path, berth_root):
    api, port = free_block(7), free_port()
    env = {**os.environ, "BERTH_CLI_CONFIG_DIR": str(tmp_path / "cfg"), "NO_COLOR": "1"}
    env.pop("BERTH_CLI_API_URL", None)
    env.pop("BERTH_CLI_TOKEN", None)
    berth = [sys.executable, "-m", "cli.main"]
    data = berth_root / f"up-{tmp_path.name}"      # app users must reach it: not in /tmp

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*berth, *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    up = run("up", "--detach", "--data-dir", str(data), "--port", str(port),
             "--api-port", str(api))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        # the CLI was logged in by `berth up`: no token given here
        saved = json.loads((tmp_path / "cfg" / "credentials.json").read_text())
        assert saved["api_url"] == f"http://127.0.0.1:{api}"
        assert run("apps", "create", "upapp").returncode == 0
        assert "upapp" in run("apps", "list").stdout
        r = request(port, "upapp.localhost")
        assert r.status == 503 and "berth push" in r.text
        again = run("up", "--detach", "--data-dir", str(data), "--port", str(port),
                    "--api-port", str(api))
        assert again.returncode != 0 and "already running" in again.stderr
        assert "berth down" in again.stderr
    finally:
        down = run("down", "--data-dir", str(data))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", api)
    assert not (data / "up.pid").exists()
