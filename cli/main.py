"""Entry point of the `berth` command."""
from __future__ import annotations

import click

from cli import (
    access,
    addons,
    admin,
    apps,
    backup,
    configvars,
    deploy,
    domains,
    limits,
    logs,
    ps,
    run,
    stats,
    tokens,
    up,
)
from cli.output import Group, console
from config.describe import COMPONENTS, print_settings, specs


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="berth")
def cli() -> None:
    """Berth: push Python web apps and run them behind a load balancer."""


@click.command("settings")
@click.argument("component", required=False, type=click.Choice(list(COMPONENTS)))
def settings(component: str | None) -> None:
    """Every setting of every component (or of COMPONENT): name, env var, type,
    default, allowed values and help."""
    print_settings(specs(component), console)


for command in (apps.login, apps.apps, deploy.push, deploy.releases, deploy.rollback,
                ps.ps, ps.scale, configvars.config_group, logs.logs, domains.domains,
                limits.maintenance, limits.limits, stats.stats, stats.hosts, run.run, up.up,
                up.down, addons.addons, addons.psql, addons.redis_cli, tokens.tokens,
                access.access, backup.backup, admin.admin, settings):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
