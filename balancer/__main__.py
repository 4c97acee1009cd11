"""`python -m balancer --config FILE.yaml`: run the balancer (a master that binds
the port and supervises `processes` workers; see master.py).

`--worker` runs one worker and is how the master starts them: daemon.py on
eventlet, aio_daemon.py with `engine: asyncio`, both driven the same way. The
master passes the inherited listening socket (`--listen-fd`), a pipe to say
"ready" on (`--ready-fd`) and, on a reload, `--wait-routes`. A worker run by hand
without `--listen-fd` binds the port itself (SO_REUSEPORT).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="eventlet")

from balancer.listener import check_trusted  # noqa: E402
from balancer.settings import SPEC  # noqa: E402
from config import SettingsError, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancer",
                                     description="Berth HTTP/1.1 balancer")
    parser.add_argument("--config", help="YAML settings file (section `balancer:`)")
    parser.add_argument("--listen-port", type=int, help="override listen_port")
    parser.add_argument("--worker", action="store_true",
                        help="run one worker process (the master starts these)")
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wait-routes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = SPEC.load(args.config, listen_port=args.listen_port)
    except SettingsError as exc:
        return _error(exc)
    setup_logging("balancer", settings.host_id, settings.log_level)
    if settings.engine not in ("eventlet", "asyncio"):
        print(f"Error: setting balancer.engine must be eventlet or asyncio, got "
              f"{settings.engine!r}", file=sys.stderr)
        print("Hint: set engine: asyncio (the default) or engine: eventlet", file=sys.stderr)
        return 2
    try:
        # checked here, before any worker starts, so the error names the setting
        check_trusted(settings.trusted_proxies)
    except SettingsError as exc:
        return _error(exc)
    if args.worker:
        return _worker(settings, args)
    from balancer.master import Master
    master = Master(settings, args.config)
    try:
        master.start()
    except (SettingsError, OSError) as exc:
        print(f"Error: cannot start the balancer: {exc}", file=sys.stderr)
        return 1
    return master.run()


def _worker(settings: Any, args: argparse.Namespace) -> int:
    balancer: Any
    if settings.engine == "asyncio":
        from balancer.aio_daemon import Balancer as AioBalancer
        balancer = AioBalancer(settings)
    else:
        from balancer.daemon import Balancer  # imports eventlet
        balancer = Balancer(settings)
    try:
        balancer.start(args.listen_fd, wait_routes=args.wait_routes,
                       ready_fd=args.ready_fd, master_pid=args.master_pid)
    except (SettingsError, OSError) as exc:
        print(f"Error: cannot start the balancer worker: {exc}", file=sys.stderr)
        return 1
    balancer.run()
    return 0


def _error(exc: SettingsError) -> int:
    print(f"Error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"Hint: {exc.hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
