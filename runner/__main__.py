"""`python -m runner --config FILE.yaml`: run this host's runner until SIGTERM/SIGINT."""
from __future__ import annotations

import sys

import click
import zmq

from config import reporting, setup_logging
from config.describe import help_settings_option
from config.report import SETTINGS, START
from runner.daemon import Runner
from runner.settings import SPEC


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML file with a `runner:` section; BERTH_RUNNER_* env vars override it.")
@help_settings_option("runner")
def main(config_path: str | None) -> None:
    with reporting(SETTINGS):
        settings = SPEC.load(config_path)
    setup_logging("runner", settings.host_id, settings.log_level)
    with reporting(START, wrap=(OSError, zmq.ZMQError), doing="start the runner"):
        runner = Runner(settings)
        runner.start()
    sys.exit(runner.run())


if __name__ == "__main__":
    main()
