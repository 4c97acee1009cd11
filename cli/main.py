"""Entry point of the `berth` command."""
from __future__ import annotations

import click

from cli import apps, configvars, deploy, domains, limits, logs, ps, stats, up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="berth")
def cli() -> None:
    """Berth: push Python web apps and run them behind a load balancer."""


for command in (apps.login, apps.apps, deploy.push, deploy.releases, deploy.rollback,
                ps.ps, ps.scale, configvars.config_group, logs.logs, domains.domains,
                limits.maintenance, limits.limits, stats.stats, stats.hosts, up.up,
                up.down):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
