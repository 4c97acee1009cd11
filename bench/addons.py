"""How long provisioning an addon takes, per engine and plan. Run by hand, as root
(the servers run as the postgres and redis system users):

    .venv/bin/python bench/addons.py [--rounds 15] [--max-seconds 120]

It makes a Provisioner in a temporary directory (shared servers started once, on free
ports, before any timing; every server stopped by PID at the end), then times, each
`--rounds` times, `Provisioner.provision()` of a new addon until its credentials are
returned (for shared Postgres that includes the first TCP login with them, which the
provisioner waits for; for dedicated Postgres the first login through PgBouncer), then
`destroy()` outside the clock; also `rotate()` and a quota check. Prints median, min
and max against the issue's targets; --max-seconds bounds the whole run.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbprovision.service import Provisioner  # noqa: E402

TARGETS = {("postgres", "shared"): 0.3, ("postgres", "dedicated"): 1.5,
           ("redis", "dedicated"): 0.2, ("postgres", "ha"): 3.0}


def measure(fn: Callable[[], object], rounds: int, deadline: float,
            after: Callable[[], object] | None = None) -> list[float]:
    """Times of `fn`; `after` runs between rounds, off the clock."""
    times: list[float] = []
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return times


def drop_spares(prov: Provisioner) -> None:
    from contextlib import closing

    from psycopg2 import sql

    from dbprovision.pgshared import SPARE_PREFIX
    with closing(prov.pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                    (SPARE_PREFIX,))
        for (name,) in cur.fetchall():
            cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    top = Path(tempfile.mkdtemp(prefix="berth-bench-addons-", dir="/var/tmp"))
    top.chmod(0o711)
    prov = Provisioner(top / "addons")
    rows: list[tuple[str, list[float], float | None]] = []
    try:
        start = time.perf_counter()
        prov.ensure_shared_servers()
        rows.append(("shared servers: first start (initdb + redis)",
                     [time.perf_counter() - start], None))
        for engine, plan, spares in [("postgres", "shared", True),
                                     ("postgres", "shared", False),
                                     ("postgres", "dedicated", False),
                                     ("redis", "shared", False), ("redis", "dedicated", False),
                                     ("postgres", "ha", False), ("redis", "ha", False)]:
            made: list[str] = []

            def provision(engine: str = engine, plan: str = plan,
                          made: list[str] = made) -> None:
                addon = f"bench-{uuid.uuid4().hex[:8]}"
                made.append(addon)
                prov.provision(addon, engine, plan)  # type: ignore[arg-type]

            if (engine, plan, spares) == ("postgres", "shared", False):
                drop_spares(prov)
            rounds = min(args.rounds, 5) if plan == "ha" else args.rounds
            times = measure(provision, rounds, deadline,
                            after=prov.refill_spares if spares else None)
            label = {True: " (a spare database ready)",
                     False: " (no spare: CREATE DATABASE)"}[spares] \
                if (engine, plan) == ("postgres", "shared") else ""
            rows.append((f"provision {engine} {plan}{label}", times,
                         TARGETS.get((engine, plan))))
            addon = made[0]
            if not spares:
                rows.append((f"rotate {engine} {plan}", measure(
                    lambda a=addon, e=engine, p=plan: prov.rotate(a, e, p),  # type: ignore
                    rounds, deadline), None))
            if plan == "shared" and not spares:
                rows.append((f"quota check {engine} {plan}", measure(
                    lambda a=addon: prov.enforce_quota(a, 1024), args.rounds, deadline),
                    None))
            destroy_times = []
            for addon in made:
                start = time.perf_counter()
                prov.destroy(addon, engine, plan)  # type: ignore[arg-type]
                destroy_times.append(time.perf_counter() - start)
            rows.append((f"destroy {engine} {plan}{label}", destroy_times, None))
    finally:
        prov.stop_all()
        shutil.rmtree(top, ignore_errors=True)
    print(f"{'what':<58} {'n':>3} {'median s':>9} {'min s':>7} {'max s':>7} {'target':>7}")
    for what, times, target in rows:
        if not times:
            continue
        verdict = "" if target is None else (
            f"< {target:g}" + (" ok" if statistics.median(times) < target else " MISSED"))
        print(f"{what:<58} {len(times):>3} {statistics.median(times):>9.3f} "
              f"{min(times):>7.3f} {max(times):>7.3f} {verdict:>7}")


if __name__ == "__main__":
    main()
