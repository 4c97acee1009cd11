"""`berth settings`, and the CLI's defaults taken from the declarations."""
import yaml
from click.testing import CliRunner

from cli import apps, up
from cli.localplatform import LocalPlatform, Ports
from cli.main import cli
from config.describe import COMPONENTS, spec
from messaging.channels import API_PORT, BALANCER_PORT, CHANNELS, api_url


def test_berth_settings_lists_every_setting_of_every_component():
    result = CliRunner().invoke(cli, ["settings"])
    assert result.exit_code == 0, result.output
    for component in COMPONENTS:
        one = spec(component)
        assert f"{component} settings" in result.stdout
        for name in one.settings:
            assert name in result.stdout and one.env_name(name) in result.stdout


def test_berth_settings_for_one_component():
    result = CliRunner().invoke(cli, ["settings", "runner"])
    assert result.exit_code == 0
    assert "BERTH_RUNNER_ISOLATION" in result.stdout and "auto, on, off" in result.stdout
    assert "balancer settings" not in result.stdout
    bad = CliRunner().invoke(cli, ["settings", "nope"])
    assert bad.exit_code == 2


def test_cli_defaults_come_from_the_declarations():
    params = {p.name: p for p in apps.login.params}
    assert params["api_url"].default == api_url()
    params = {p.name: p for p in up.up.params}
    assert params["api_port"].default == API_PORT and params["port"].default == BALANCER_PORT


def test_ports_follow_the_channels(tmp_path):
    assert Ports() == Ports.after_api(API_PORT)
    assert Ports().for_channel("routes_snapshot") == CHANNELS["routes_snapshot"].default_port
    ports = Ports.after_api(9700, balancer=9000)
    assert (ports.api, ports.control, ports.stats_out, ports.balancer) == (9700, 9701, 9706, 9000)
    platform = LocalPlatform(tmp_path / "p", ports)
    written = yaml.safe_load(platform.write_config().read_text())
    for component in ("controller", "runner", "balancer"):   # loads: every key is declared
        cfg = spec(component)
        loaded = cfg.load(platform.config_path(), environ={})
        for ch in CHANNELS.values():
            if ch.endpoint_setting in cfg.settings:
                port = ports.for_channel(ch.name)
                assert getattr(loaded, ch.endpoint_setting) == f"tcp://127.0.0.1:{port}"
    assert written["runner"]["controller_url"] == "http://127.0.0.1:9700"
    assert written["balancer"]["listen_port"] == 9000
