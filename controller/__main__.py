"""`python -m controller --config berth.yaml`"""
from __future__ import annotations

import sys

import click

from config import SettingsError, setup_logging
from controller.daemon import Controller, install_signals
from controller.settings import SPEC


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML settings file with a `controller:` section.")
def main(config_path: str | None) -> None:
    try:
        settings = SPEC.load(config_path)
    except SettingsError as exc:
        click.echo(f"Error: {exc.message}\nHint: {exc.hint}", err=True)
        sys.exit(2)
    setup_logging("controller", settings.host_id, settings.log_level)
    controller = Controller(settings)
    install_signals(controller)
    controller.start()
    controller.run()


if __name__ == "__main__":
    main()
