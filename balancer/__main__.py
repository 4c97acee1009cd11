"""`python -m balancer --config FILE.yaml`: run the balancer daemon."""
from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="eventlet")

from balancer.settings import SPEC  # noqa: E402
from config import SettingsError, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancer",
                                     description="Berth HTTP/1.1 balancer")
    parser.add_argument("--config", help="YAML settings file (section `balancer:`)")
    parser.add_argument("--listen-port", type=int, help="override listen_port")
    args = parser.parse_args(argv)
    try:
        settings = SPEC.load(args.config, listen_port=args.listen_port)
    except SettingsError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"Hint: {exc.hint}", file=sys.stderr)
        return 2
    setup_logging("balancer", settings.host_id, settings.log_level)
    if settings.engine == "asyncio":
        from balancer.aio_daemon import Balancer
    elif settings.engine == "eventlet":
        from balancer.daemon import Balancer   # type: ignore[assignment]  # imports eventlet
    else:
        print(f"Error: setting balancer.engine must be eventlet or asyncio, got "
              f"{settings.engine!r}", file=sys.stderr)
        return 2
    balancer = Balancer(settings)
    try:
        balancer.start()
    except (SettingsError, OSError) as exc:
        print(f"Error: cannot start the balancer: {exc}", file=sys.stderr)
        return 1
    balancer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
