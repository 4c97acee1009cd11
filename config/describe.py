"""Every declared setting as a table: `berth settings [COMPONENT]` and each daemon's
`--help-settings` both print through `print_settings`, straight from the Specs.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from config.declare import Spec

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# component -> module declaring its SPEC (none of them imports pyzmq)
COMPONENTS = {"controller": "controller.settings", "runner": "runner.settings",
              "balancer": "balancer.settings", "cli": "cli.settings"}

WHERE = {"cli": "environment only"}
WIDE = 160      # columns when the output is not a terminal (a pipe, a file, a test)


def spec(component: str) -> Spec:
    result: Spec = importlib.import_module(COMPONENTS[component]).SPEC
    return result


def specs(component: str | None = None) -> list[Spec]:
    return [spec(c) for c in ([component] if component else COMPONENTS)]


def show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return '""' if value == "" else str(value)


def table(one: Spec) -> Table:
    """One row per setting: name over env var, type, default over allowed values, help."""
    from rich.table import Table
    from rich.text import Text

    where = WHERE.get(one.component,
                      f"section `{one.component}:` of --config FILE, then the environment")
    out = Table(title=f"{one.component} settings ({where})", title_justify="left",
                title_style="bold", box=None, header_style="bold", pad_edge=False)
    out.add_column("setting / env var", no_wrap=True)
    out.add_column("type", no_wrap=True)
    out.add_column("default / allowed", overflow="fold", max_width=34)
    out.add_column("help", overflow="fold")
    for row in one.describe():
        name = Text(row["name"], style="bold")
        name.append("\n" + row["env"], style="dim")
        default = Text(show_default(row["default"]))
        if row["allowed"]:
            default.append("\n" + row["allowed"], style="dim")
        out.add_row(name, row["type"], default, row["help"])
    return out


def print_settings(chosen: list[Spec], console: Console | None = None) -> None:
    """Print one table per component to `console` (stdout by default); when that is
    not a terminal, as wide as a row needs rather than 80 columns."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if not console.is_terminal and console.width < WIDE:
        console = Console(file=console.file, highlight=False, width=WIDE)
    for i, one in enumerate(chosen):
        if i:
            console.print()
        console.print(table(one))


def help_settings_option(component: str) -> Callable[[Any], Any]:
    """`--help-settings` for a click command: print the component's settings, exit 0."""
    import click

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            print_settings(specs(component))
            ctx.exit(0)

    return click.option("--help-settings", is_flag=True, expose_value=False, is_eager=True,
                        callback=show,
                        help="List every setting: name, env var, type, default, allowed "
                             "values and help.")
