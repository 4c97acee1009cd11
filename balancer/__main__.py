"""`python -m balancer --config FILE.yaml`: run the balancer (a master that binds
the port and supervises `processes` workers; see master.py).

`--worker` runs one worker and is how the master starts them: daemon.py on the
configured engine (engines.py: asyncio or eventlet). The
master passes the inherited listening socket (`--listen-fd`), a pipe to say
"ready" on (`--ready-fd`) and, on a reload, `--wait-routes`. A worker run by hand
without `--listen-fd` binds the port itself (SO_REUSEPORT).

Errors go through config.report: settings errors exit 2, start errors 1.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="eventlet")

from balancer.settings import SPEC  # noqa: E402
from config import reporting, setup_logging  # noqa: E402
from config.describe import print_settings  # noqa: E402
from config.report import SETTINGS, START  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancer",
                                     description="Berth HTTP/1.1 balancer")
    parser.add_argument("--config", help="YAML settings file (section `balancer:`); "
                                         "BERTH_BALANCER_* env vars override it")
    parser.add_argument("--listen-port", type=int, help="override listen_port")
    parser.add_argument("--help-settings", action="store_true",
                        help="list every setting: name, env var, type, default, allowed "
                             "values and help")
    parser.add_argument("--worker", action="store_true",
                        help="run one worker process (the master starts these)")
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wait-routes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.help_settings:
        print_settings([SPEC])
        return 0
    with reporting(SETTINGS):       # engine, trusted_proxies, listen_host: declared checks
        settings = SPEC.load(args.config, listen_port=args.listen_port)
    setup_logging("balancer", settings.host_id, settings.log_level)
    if args.worker:
        return _worker(settings, args)
    from balancer.master import Master
    master = Master(settings, args.config)
    with reporting(START, doing=f"start the balancer on {settings.listen_host}:"
                                f"{settings.listen_port}"):
        master.start()
    return master.run()


def _worker(settings: Any, args: argparse.Namespace) -> int:
    doing = "start the balancer worker"
    if settings.native:
        from balancer import native
        native.enable()         # before anything imports the modules it compiles
    with reporting(START, doing=doing):
        from balancer import engines
        engine = engines.load(settings)     # eventlet, when named, is imported first
        from balancer.daemon import Balancer
        balancer = Balancer(settings, engine)
    import zmq

    with reporting(START, wrap=(OSError, zmq.ZMQError), doing=doing):
        balancer.start(args.listen_fd, wait_routes=args.wait_routes,
                       ready_fd=args.ready_fd, master_pid=args.master_pid)
    balancer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

