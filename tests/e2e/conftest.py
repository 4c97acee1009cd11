"""The platform as `berth up` starts it (cli.localplatform), on free ports, with the
runner on 127.0.0.2 as a separate simulated host, driven through the real CLI."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli.localplatform import LocalPlatform, Ports
from tests.conftest import forget_apps, new_apps_dir

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hello"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Berth:
    """Runs the real `berth` CLI against one platform."""

    def __init__(self, platform: LocalPlatform, config_dir: Path) -> None:
        self.platform = platform
        self.env = {**os.environ, "BERTH_CLI_CONFIG_DIR": str(config_dir),
                    "BERTH_CLI_API_URL": platform.api_url,
                    "BERTH_CLI_TOKEN": platform.admin_token, "NO_COLOR": "1",
                    "COLUMNS": "200"}
        self.env.pop("BERTH_APP", None)

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True,
                 timeout: float = 300, env: dict[str, str] | None = None,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd or ROOT,
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"berth {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def get(self, app: str, path: str = "/", port: int | None = None,
            timeout: float = 10) -> Response:
        return request(port or self.platform.ports.balancer, f"{app}.localhost", path,
                       timeout=timeout)

    def wait_for(self, check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except (OSError, AssertionError, KeyError) as exc:
                last = exc
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what or check}: last {last!r}\n"
                             + self.platform.log_tail("controller"))


def request(port: int, host: str, path: str = "/", method: str = "GET",
            timeout: float = 10, body: bytes | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": host})
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


def start_platform(data_dir: Path, venv_cache: Path, apps_dir: Path,
                   runners: list[tuple[str, str]] | None = None,
                   jobs: bool = False) -> LocalPlatform:
    """`apps_dir` must be reachable by app users (see tests/conftest.berth_root).
    `jobs`: also the broker, job workers and beat (addons)."""
    platform = LocalPlatform(data_dir, Ports.free(),
                             runners=runners or [("runner-1", "127.0.0.2")],
                             wheel_cache_dir=str(venv_cache), apps_dir=str(apps_dir),
                             drain_seconds=1.0, jobs=jobs)
    try:
        platform.start()
    except BaseException:
        platform.stop()
        raise
    return platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path, berth_root: Path):
    apps = new_apps_dir(berth_root)
    p = start_platform(tmp_path_factory.mktemp("platform"), venv_cache, apps)
    yield p
    p.stop()
    forget_apps(apps)


@pytest.fixture(scope="module")
def berth(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> Berth:
    return Berth(platform, tmp_path_factory.mktemp("cli-config"))


def copy_example(dest: Path) -> Path:
    shutil.copytree(EXAMPLE, dest)
    return dest


def serve_example(platform: LocalPlatform, factory: pytest.TempPathFactory,
                  app: str = "steady", web: int = 2) -> Berth:
    """The example app pushed as `app` and scaled to `web` RUNNING web instances; the
    CLI that did it."""
    b = Berth(platform, factory.mktemp("cli"))
    b("apps", "create", app)
    b("push", str(copy_example(factory.mktemp("app") / app)), "-a", app, timeout=600)
    b("scale", f"web={web}", "-a", app)
    b.wait_for(lambda: sum(i["state"] == "RUNNING" for i in b.json(
        "ps", "-a", app)["instances"]) == web, 120, f"{web} RUNNING web instances")
    return b
