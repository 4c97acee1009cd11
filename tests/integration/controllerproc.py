"""A real controller process on free loopback ports, alone (no runner): for tests of
its API server, its tokens and its locks channel. Stopped by PID."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cli.localplatform import Ports
from controller import settings as controller_settings

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


class ControllerProc:
    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.data_dir = data_dir
        self.ports = Ports.free()
        data_dir.mkdir(parents=True, exist_ok=True)
        cfg = {"controller": {"data_dir": str(data_dir / "controller"),
                              "api_port": self.ports.api,
                              **self.ports.endpoints(controller_settings.SPEC), **settings}}
        self.config = data_dir / "berth.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = data_dir / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def locks_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.locks}"

    @property
    def lock_events_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.lock_events}"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "controller" / "admin.token").read_text().strip()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller", "--config", str(self.config)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/v1/health", token=None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the controller did not answer /v1/health:\n"
                             + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def request(self, method: str, path: str, body: Any = None, *,
                token: str | None = "admin", headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        """(status, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports.api, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if token is not None:
                hdrs["Authorization"] = "Bearer " + (self.admin_token if token == "admin"
                                                     else token)
            data = json.dumps(body).encode() if body is not None else None
            if data is not None:
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()


@contextmanager
def running_controller(data_dir: Path, **settings: Any) -> Iterator[ControllerProc]:
    ctl = ControllerProc(data_dir, **settings)
    try:
        ctl.start()
        yield ctl
    finally:
        ctl.stop()
