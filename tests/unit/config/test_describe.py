"""Every declared setting is listed: `berth settings` and each daemon's
--help-settings print the same table, from the declarations."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from config.describe import COMPONENTS, print_settings, show_default, spec, specs

ROOT = Path(__file__).resolve().parents[3]


def render(component=None) -> str:
    buf = io.StringIO()
    print_settings(specs(component), Console(file=buf, width=80))
    return buf.getvalue()


def assert_lists_every_setting(text: str, component: str) -> None:
    one = spec(component)
    assert f"{component} settings" in text
    for s in one.settings.values():
        assert s.name in text and one.env_name(s.name) in text, s.name
        assert s.help.split()[0] in text, s.name
        for choice in s.choices:
            assert str(choice) in text


def test_every_setting_of_every_component_is_printed_even_when_narrow():
    text = render()
    for component in COMPONENTS:
        assert_lists_every_setting(text, component)
    assert "tcp://127.0.0.1:8701" in text and "asyncio, eventlet" in text


def test_one_component():
    text = render("balancer")
    assert_lists_every_setting(text, "balancer")
    assert "controller settings" not in text


def test_defaults_are_shown_readably():
    assert [show_default(v) for v in (True, "", [], ["a", "b"], 2.0)] == \
        ["true", '""', "[]", "a,b", "2.0"]


@pytest.mark.parametrize("component", ["controller", "runner", "balancer"])
def test_each_daemon_has_help_settings(component):
    out = subprocess.run([sys.executable, "-m", component, "--help-settings"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_lists_every_setting(out.stdout, component)
    assert not any(f"{other} settings" in out.stdout for other in COMPONENTS
                   if other != component)
