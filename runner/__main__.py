"""`python -m runner --config FILE.yaml`: run this host's runner until SIGTERM/SIGINT."""
from __future__ import annotations

import sys

import click

from config import setup_logging
from messaging.errors import BerthError
from runner.daemon import Runner
from runner.settings import SPEC


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with a `runner:` section; BERTH_RUNNER_* env vars override it.")
def main(config_path: str | None) -> None:
    try:
        settings = SPEC.load(config_path)
    except BerthError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"Hint: {exc.hint}", err=True)
        sys.exit(2)
    setup_logging("runner", settings.host_id, settings.log_level)
    runner = Runner(settings)
    runner.start()
    sys.exit(runner.run())


if __name__ == "__main__":
    main()
