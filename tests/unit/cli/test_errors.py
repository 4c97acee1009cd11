"""The CLI reports every command's errors once, at the group."""
import click
from click.testing import CliRunner

from cli.main import cli
from cli.output import Group
from config import SettingsError
from messaging.errors import BerthError


@click.group(cls=Group)
def demo() -> None:
    pass


@demo.group()
def sub() -> None:
    pass


@sub.command()
@click.argument("what")
def boom(what: str) -> None:
    if what == "berth":
        raise BerthError("app 'x' not found", "run `berth apps list`", status=404)
    if what == "settings":
        raise SettingsError("setting cli.deploy_timeout from $X must be a number", "write one")
    if what == "bare":
        raise BerthError("no hint here")
    raise KeyboardInterrupt


def run(*args: str):
    return CliRunner().invoke(demo, ["sub", "boom", *args])


def test_a_berth_error_in_a_nested_command_is_reported_by_the_group():
    result = run("berth")
    assert result.exit_code == 4                   # NOT_FOUND, by the error's status
    assert result.stderr == "Error: app 'x' not found\nHint: run `berth apps list`\n"
    assert result.stdout == ""


def test_settings_errors_are_usage_errors():
    result = run("settings")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[1] == "Hint: write one"


def test_no_empty_hint_line():
    assert run("bare").stderr == "Error: no hint here\n"


def test_ctrl_c_prints_interrupted_and_exits_130():
    result = run("ctrl-c")
    assert result.exit_code == 130 and result.stderr == "Interrupted.\n"


def test_berth_is_such_a_group_and_reports_bad_settings(tmp_path):
    assert isinstance(cli, Group)
    result = CliRunner().invoke(cli, ["apps", "list"], env={
        "BERTH_CLI_DEPLOY_TIMEOUT": "abc", "BERTH_CLI_CONFIG_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: setting cli.deploy_timeout from "
                                    "$BERTH_CLI_DEPLOY_TIMEOUT must be a number, got 'abc'\n"
                                    "Hint: ")
