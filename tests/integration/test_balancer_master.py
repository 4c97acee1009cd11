"""The balancer master's supervision, on each engine (`engine` fixture): a worker
that cannot run with the settings in the file is said once and never restarted in
a loop, and a reload under way leaves the master's loop free. Every process
started here is stopped here by its PID; loopback only."""
from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

from tests.integration.test_balancer import (  # noqa: F401  (fixtures)
    BalancerProc, Publisher, _bounded, backends, engine, free_port, get, publisher,
    tmp, wait_for, wait_routed,
)
from tests.integration.test_balancer_limits import alive, worker_pids

BAD = "  trusted_proxies: [nonsense]\n"     # refused by the settings check (exit 2)


def spoil_config(bal: BalancerProc, tmp) -> None:
    path = tmp / f"balancer-{bal.port}.yaml"
    path.write_text(path.read_text() + BAD)


def test_reload_into_a_bad_setting_is_said_once_and_keeps_the_old_workers(
        tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, log_level="info", **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        wait_for(lambda: "balancer master running" in bal.stderr.read_text(),
                 what="master running")
        first = worker_pids(bal.proc.pid)
        spoil_config(bal, tmp)
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload abandoned" in bal.stderr.read_text(), timeout=20,
                 what="reload abandoned")
        time.sleep(1.5)       # room for a respawn loop to show itself
        log = bal.stderr.read_text()
        assert log.count("reload abandoned") == 1
        assert "refused the settings" in log and "balancer.trusted_proxies" in log
        assert log.count("worker started") == 2          # the first, the reload's one
        assert bal.proc.poll() is None
        assert worker_pids(bal.proc.pid) == first
        assert get(bal.port, "alpha.localhost")[0] == 200
    finally:
        assert bal.stop() == 0


def test_a_worker_restarted_into_a_bad_setting_is_fatal_not_respawned(
        tmp, publisher, backends, engine):
    bal = BalancerProc(tmp, publisher, log_level="info", **engine)
    try:
        wait_routed(bal.port, "alpha.localhost")
        wait_for(lambda: "balancer master running" in bal.stderr.read_text(),
                 what="master running")
        [worker] = worker_pids(bal.proc.pid)
        spoil_config(bal, tmp)
        os.kill(worker, signal.SIGKILL)        # the worker this test's master started
        assert bal.proc.wait(20) == 2
        log = bal.stderr.read_text()
        assert log.count("worker FATAL") == 1
        assert "configuration error" in log
        assert log.count("worker started") == 2          # the first, one restart
    finally:
        bal.stop()


def test_a_reload_waiting_for_routes_leaves_the_master_loop_free(tmp, engine):
    # a controller that never answers: the reload's new workers wait for routes
    # for a minute; a stop meanwhile is handled at once
    nowhere = SimpleNamespace(**{name: f"tcp://127.0.0.1:{free_port()}" for name in (
        "routes_endpoint", "snapshot_endpoint", "logs_endpoint")})
    bal = BalancerProc(tmp, nowhere, startup_routes_wait=0.2, reload_timeout=60,
                       shutdown_timeout=2, log_level="info", **engine)
    new: list[int] = []
    try:
        assert get(bal.port, "alpha.localhost")[0] == 503
        first = worker_pids(bal.proc.pid)
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: new workers started" in bal.stderr.read_text(),
                 what="reload started")
        wait_for(lambda: len(worker_pids(bal.proc.pid)) == 2, what="new worker")
        new = [p for p in worker_pids(bal.proc.pid) if p not in first]
        assert get(bal.port, "alpha.localhost")[0] == 503   # the old one serves
        started = time.monotonic()
        bal.proc.send_signal(signal.SIGTERM)
        assert bal.proc.wait(20) == 0
        assert time.monotonic() - started < 15      # not after reload_timeout (60 s)
        wait_for(lambda: not any(alive(p) for p in new + first), what="workers gone")
    finally:
        bal.stop()
