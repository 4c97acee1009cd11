"""`python -m controller --config berth.yaml`"""
from __future__ import annotations

import sys

import click
import zmq

from config import reporting, setup_logging
from config.describe import help_settings_option
from config.report import SETTINGS, START
from controller.daemon import Controller, install_signals
from controller.settings import SPEC


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML settings file with a `controller:` section; BERTH_CONTROLLER_* "
                   "env vars override it.")
@help_settings_option("controller")
def main(config_path: str | None) -> None:
    with reporting(SETTINGS):
        settings = SPEC.load(config_path)
    setup_logging("controller", settings.host_id, settings.log_level)
    with reporting(START, wrap=(OSError, zmq.ZMQError), doing="start the controller"):
        controller = Controller(settings)
        install_signals(controller)
        controller.start()
    controller.run()
    if controller.stepped_down:
        sys.exit(3)         # lost the leader lease: its supervisor starts it as a standby


if __name__ == "__main__":
    main()
