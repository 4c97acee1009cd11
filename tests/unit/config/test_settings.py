"""The components' declarations: defaults from messaging/channels.py, every default
passing its own rules, the obvious restrictions declared, and no pyzmq needed."""
import subprocess
import sys
from pathlib import Path

import pytest

from config import SettingsError
from config.describe import COMPONENTS, spec, specs
from messaging.channels import API_PORT, BALANCER_PORT, CHANNELS, api_url

ROOT = Path(__file__).resolve().parents[3]


def test_settings_and_channels_import_without_zmq():
    code = ("import config, config.describe, config.checks, config.report, "
            "controller.settings, runner.settings, balancer.settings, cli.settings, "
            "messaging.channels, sys; assert 'zmq' not in sys.modules, 'zmq imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_every_default_passes_its_own_rules(component):
    one = spec(component)
    for s in one.settings.values():
        assert one._validate(s, s.default, s.default, "the default") == s.default, s.name
    one.load(environ={})


def test_endpoint_defaults_come_from_the_channels():
    seen = set()
    for one in specs():
        for ch in CHANNELS.values():
            setting = one.settings.get(ch.endpoint_setting)
            if setting is not None:
                assert setting.default == ch.default_endpoint
                seen.add(ch.name)
    assert seen == set(CHANNELS)        # every channel has an endpoint setting somewhere
    ports = [ch.default_port for ch in CHANNELS.values()]
    assert len(set(ports)) == len(ports) and API_PORT not in ports


def test_http_defaults_come_from_one_place():
    assert spec("controller").settings["api_port"].default == API_PORT
    assert spec("controller").settings["balancer_port"].default == BALANCER_PORT
    assert spec("balancer").settings["listen_port"].default == BALANCER_PORT
    assert spec("runner").settings["controller_url"].default == api_url() \
        == f"http://127.0.0.1:{API_PORT}"


@pytest.mark.parametrize("component,name,value,words", [
    ("balancer", "engine", "tornado", "one of asyncio, eventlet"),
    ("runner", "isolation", "maybe", "one of auto, on, off"),
    ("controller", "log_level", "loud", "one of debug, info"),
    ("controller", "api_port", "0", "from 1 to 65535"),
    ("balancer", "listen_port", "70000", "from 0 to 65535"),
    ("controller", "control_endpoint", "127.0.0.1:8701", "not a tcp:// or ipc://"),
    ("runner", "logs_endpoint", "tcp://127.0.0.1:99999", "outside 1..65535"),
    ("runner", "controller_url", "127.0.0.1:8700", "not an http:// URL"),
    ("runner", "app_uid_min", "0", "from 1000"),
    ("balancer", "processes", "0", "at least 1"),
    ("balancer", "header_timeout", "0", "greater than 0"),
    ("balancer", "trusted_proxies", "10.0.0.0/8,nonsense", "'nonsense'"),
    ("balancer", "listen_host", "0.0.0.0", "not a loopback address"),
    ("cli", "deploy_timeout", "-1", "greater than 0"),
    ("cli", "api_url", "localhost", "not an http:// URL"),
])
def test_obvious_restrictions_are_declared(component, name, value, words):
    one = spec(component)
    env = one.env_name(name)
    with pytest.raises(SettingsError) as err:
        one.load(environ={env: value})
    assert f"setting {component}.{name} from ${env}" in err.value.message
    assert words in err.value.message and err.value.hint


def test_good_values_pass():
    assert spec("balancer").load(environ={"BERTH_BALANCER_ENGINE": "eventlet",
                                          "BERTH_BALANCER_LISTEN_PORT": "0"}).engine == "eventlet"
    assert spec("controller").load(environ={
        "BERTH_CONTROLLER_CONTROL_ENDPOINT": "ipc:///run/berth/control",
        "BERTH_CONTROLLER_ROUTES_ENDPOINT": "tcp://127.0.0.1:*",
        "BERTH_CONTROLLER_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_uid_range_must_be_ordered():
    with pytest.raises(SettingsError, match=r"app_uid_min \(300000\) is above app_uid_max"):
        spec("runner").load(environ={"BERTH_RUNNER_APP_UID_MIN": "300000"})
