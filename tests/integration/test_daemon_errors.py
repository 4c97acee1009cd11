"""Every daemon and the CLI print errors as `Error:` + `Hint:` through one function
each (config/report.py for the daemons, cli/output.py's Group for the CLI): each is
started for real with a bad setting, or with something in the way at start."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from config.describe import spec
from messaging.channels import CHANNELS

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    clean["BERTH_CLI_CONFIG_DIR"] = str(tmp_path / "cli")     # never the real login
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=TIMEOUT)


def error_and_hint(out: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The one Error: line and its non-empty Hint: line; nothing like a traceback."""
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    hints = [line for line in lines if line.startswith("Hint:")]
    assert len(errors) == 1, out.stderr
    assert len(hints) == 1 and hints[0][len("Hint:"):].strip(), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return errors[0], hints[0]


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "berth.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("daemon,yaml_text,env,names", [
    ("controller", "controller:\n  bogus: 1\n", {}, "controller.bogus"),
    ("controller", "controller:\n  api_port: lots\n", {}, "controller.api_port"),
    ("runner", "runner:\n  heartbeat_interval: often\n", {}, "runner.heartbeat_interval"),
    ("runner", "", {"BERTH_RUNNER_ISOLATION": "maybe"}, "runner.isolation"),
    ("balancer", "balancer:\n  engine: tornado\n", {}, "balancer.engine"),
    ("balancer", "balancer:\n  listen_port: 8000\n  wrong: x\n", {}, "balancer.wrong"),
    ("balancer", "", {"BERTH_BALANCER_PROCESSES": "0"}, "balancer.processes"),
])
def test_a_bad_setting_stops_each_daemon_with_error_and_hint(tmp_path, daemon, yaml_text,
                                                            env, names):
    out = run(["-m", daemon, "--config", config(tmp_path, yaml_text)], tmp_path, **env)
    assert out.returncode == 2, out.stderr
    error, hint = error_and_hint(out)
    assert names in error
    if env:
        assert f"${next(iter(env))}" in error and repr(next(iter(env.values()))) in error
    else:
        assert str(tmp_path / "berth.yaml") in error
    assert out.stdout == ""


def test_bad_choice_hint_lists_the_choices(tmp_path):
    out = run(["-m", "balancer", "--config",
               config(tmp_path, "balancer:\n  engine: tornado\n")], tmp_path)
    error, hint = error_and_hint(out)
    assert "'tornado'" in error and "asyncio" in hint and "eventlet" in hint


def test_a_missing_config_file_is_a_settings_error(tmp_path):
    out = run(["-m", "runner", "--config", str(tmp_path / "nope.yaml")], tmp_path)
    assert out.returncode == 2
    error, _ = error_and_hint(out)
    assert "nope.yaml" in error


@pytest.fixture
def busy_port():
    """A port held by a plain listening socket (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_endpoints(component: str) -> str:
    """YAML lines putting each of the component's endpoints on a free port."""
    lines = []
    for ch in CHANNELS.values():
        if ch.endpoint_setting in spec(component).settings:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                lines.append(f"  {ch.endpoint_setting}: tcp://127.0.0.1:{s.getsockname()[1]}\n")
    return "".join(lines)


def test_controller_start_failure_is_reported(tmp_path, busy_port):
    text = (f"controller:\n  data_dir: {tmp_path / 'data'}\n  api_port: {busy_port}\n"
            + free_endpoints("controller"))
    out = run(["-m", "controller", "--config", config(tmp_path, text)], tmp_path)
    assert out.returncode == 1, out.stderr
    error, hint = error_and_hint(out)
    assert error.startswith("Error: cannot start the controller:")
    assert "another process is using that address" in hint


def test_runner_start_failure_is_reported(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = (f"runner:\n  data_dir: {blocker / 'data'}\n  isolation: off\n"
            + free_endpoints("runner"))
    out = run(["-m", "runner", "--config", config(tmp_path, text)], tmp_path)
    assert out.returncode == 1, out.stderr
    error, hint = error_and_hint(out)
    assert error.startswith("Error: cannot start the runner:") and str(blocker) in error
    assert "not a directory" in hint


def test_balancer_start_failure_is_reported(tmp_path, busy_port):
    text = f"balancer:\n  listen_port: {busy_port}\n" + free_endpoints("balancer")
    out = run(["-m", "balancer", "--config", config(tmp_path, text)], tmp_path)
    assert out.returncode == 1, out.stderr
    error, hint = error_and_hint(out)
    assert error.startswith(f"Error: cannot start the balancer on 127.0.0.1:{busy_port}:")
    assert "another process is using that address" in hint


def test_cli_bad_setting(tmp_path):
    out = run(["-m", "cli.main", "apps", "list"], tmp_path, BERTH_CLI_DEPLOY_TIMEOUT="abc")
    assert out.returncode == 2, out.stderr
    error, hint = error_and_hint(out)
    assert "cli.deploy_timeout" in error and "$BERTH_CLI_DEPLOY_TIMEOUT" in error
    assert "'abc'" in error


def test_cli_unreachable_api(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]        # nothing listens once it is closed
    url = f"http://127.0.0.1:{port}"
    out = run(["-m", "cli.main", "login", "--api", url, "--token", "t"], tmp_path)
    assert out.returncode == 5, out.stderr          # Exit.UNAVAILABLE
    error, hint = error_and_hint(out)
    assert url in error and "berth up" in hint
    out = run(["-m", "cli.main", "apps", "list"], tmp_path,
              BERTH_CLI_API_URL=url, BERTH_CLI_TOKEN="t")
    assert out.returncode == 5
    error, _ = error_and_hint(out)
    assert url in error
