"""The balancer master: owns the listening sockets and supervises worker processes.

It imports neither eventlet nor zmq, nor anything of an engine: it binds one
SO_REUSEPORT socket per worker slot (`processes` of them, on the same port, so the
kernel spreads connections across workers), starts one worker per slot
(`python -m balancer --worker`, which inherits its slot's socket and runs on the
configured engine, eventlet or asyncio) and then only waits for signals and reaps
children. Workers of either engine keep the same contract: "ready" on the ready
pipe once they accept, SIGTERM drains, and they stop when the master is gone.
The sockets stay open in the master for its whole life, so a worker that stops
never takes an accept queue (and the connections waiting in it) with it.

Signals (handlers only enqueue; run() dispatches):
- SIGHUP: reload. New workers start (they read the config file again), wait for
  their first route table, then say they are ready; only then are the old workers
  sent SIGTERM, and they finish their in-flight requests. The loop goes on
  meanwhile (reaping, signals): the reload is a state it looks at each turn. If a
  new worker exits (a bad setting in the file: exit 2) or the new workers are not
  ready within reload_timeout, the reload is abandoned, said once, and the old
  workers keep serving.
- SIGTERM/SIGINT: stop. Every worker gets SIGTERM, stops accepting and finishes its
  in-flight requests (bounded by shutdown_timeout); the master exits 0.
A worker that dies on its own is started again, after a backoff that doubles while
it keeps dying young. A worker that exits on a configuration error (exit 2), or
dies young MAX_YOUNG_DEATHS times running, is FATAL: the master says so once,
stops the other workers and exits 2, rather than restart it forever (a slot left
without a worker would hold the connections the kernel gives its socket).
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from balancer.listener import check_loopback, listening_socket
from config import SettingsError
from config.report import SETTINGS

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0     # seconds a first worker has to start accepting
KILL_GRACE = 5.0         # past shutdown_timeout, a retiring worker is killed
YOUNG = 5.0              # a worker dying within this many seconds died young
MAX_BACKOFF = 30.0
MAX_YOUNG_DEATHS = 5     # young deaths in a row that make a slot FATAL
TICK = 0.05              # seconds the loop waits between two turns


@dataclass
class Worker:
    slot: int
    proc: subprocess.Popen
    ready_fd: int | None                 # read end of its ready pipe until ready
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    retiring_since: float | None = None  # when it was told to stop

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Reload:
    """A reload under way: `new` workers loading routes, `old` ones serving."""
    old: list[Worker]
    new: list[Worker]
    deadline: float


class Master:
    def __init__(self, settings: SimpleNamespace, config_path: str | None) -> None:
        self.s = settings
        self.config_path = config_path
        self.sockets: list[socket.socket] = []
        self.workers: list[Worker] = []
        self.signals: list[int] = []
        self.stopping = False
        self.backoff: dict[int, float] = {}        # slot -> seconds before restart
        self.restart_at: dict[int, float] = {}     # slot -> when to restart it
        self.young_deaths: dict[int, int] = {}     # slot -> young deaths in a row
        self.reload: Reload | None = None
        self.exit_code = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind every slot's socket and start the first workers; raises when one
        of them cannot start."""
        # handlers first: a signal during start is queued, never fatal (a master
        # killed by a default handler would orphan its workers)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        check_loopback(self.s.listen_host)
        count = max(1, int(self.s.processes))
        port = self.s.listen_port
        for _ in range(count):
            sock = listening_socket(self.s.listen_host, port)
            port = sock.getsockname()[1]
            self.sockets.append(sock)
        self.s.listen_port = port
        for slot in range(count):
            self.workers.append(self._spawn(slot, wait_routes=False))
        if not self._wait_ready([w for w in self.workers], START_TIMEOUT):
            for worker in self.workers:
                if not worker.ready and worker.ready_fd is None:
                    try:      # it closed its pipe without a word: it is exiting
                        worker.proc.wait(2)
                    except subprocess.TimeoutExpired:
                        pass
            codes = [w.proc.poll() for w in self.workers]
            self._terminate(self.workers)
            self._reap_all(KILL_GRACE)
            raise SettingsError(f"a balancer worker failed to start (exit codes {codes})",
                                "see the worker's error above")
        log.info("balancer master running", extra={
            "port": port, "processes": count, "pid": os.getpid(),
            "workers": " ".join(str(w.pid) for w in self.workers)})

    def run(self) -> int:
        while True:
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGHUP and not self.stopping:
                    self.handle_hup()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    self.handle_term()
            if self.reload is not None:
                self._reload_step()
            self._reap()
            if self.stopping and not self.workers:
                break
            self._restart_due()
            if self.reload is not None:
                self._poll_ready(self.reload.new, TICK)
            else:
                time.sleep(TICK)
        for sock in self.sockets:
            sock.close()
        log.info("balancer master stopped", extra={"code": self.exit_code})
        return self.exit_code

    def handle_hup(self) -> None:
        """Reload: new workers first, old ones retire once the new are ready
        (_reload_step, each turn of the loop)."""
        if self.reload is not None:
            log.warning("reload already under way; this one is ignored")
            return
        old = [w for w in self.workers if w.retiring_since is None]
        new = [self._spawn(slot, wait_routes=True) for slot in range(len(self.sockets))]
        self.workers.extend(new)
        self.reload = Reload(old, new, time.monotonic() + float(self.s.reload_timeout))
        log.info("reload: new workers started, waiting for their routes",
                 extra={"new": " ".join(str(w.pid) for w in new)})

    def _reload_step(self) -> None:
        """Finish the reload under way when its new workers are all ready; abandon
        it when one of them exited or the time ran out."""
        reload = self.reload
        assert reload is not None
        if all(w.ready for w in reload.new):
            self.reload = None
            self._terminate(reload.old)
            log.info("reload: new workers ready; old ones finish in-flight requests",
                     extra={"old": " ".join(str(w.pid) for w in reload.old)})
            return
        exited = [w for w in reload.new if w.proc.poll() is not None]
        if not exited and time.monotonic() < reload.deadline:
            return
        self.reload = None
        self._terminate(reload.new)
        if exited:
            code = exited[0].proc.returncode
            why = ("a new worker refused the settings" if code == SETTINGS
                   else "a new worker exited")
            log.error(f"reload abandoned: {why} (see its error above); the old ones "
                      "keep serving", extra={"worker_pid": exited[0].pid, "code": code})
        else:
            log.error("reload abandoned: new workers were not ready in time; the old "
                      "ones keep serving", extra={"timeout": self.s.reload_timeout})

    def handle_term(self) -> None:
        if self.stopping:
            return
        log.info("stop signal: workers finish their in-flight requests",
                 extra={"workers": len(self.workers)})
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping = True
        self.reload = None
        self.restart_at.clear()
        self._terminate(self.workers)
        for sock in self.sockets:     # no new connection will be accepted now
            sock.close()
        self.sockets = []

    # -- workers -----------------------------------------------------------------------

    def _spawn(self, slot: int, *, wait_routes: bool) -> Worker:
        ready_r, ready_w = os.pipe()
        fd = self.sockets[slot].fileno()
        argv = [sys.executable, "-m", "balancer", "--worker", "--listen-fd", str(fd),
                "--ready-fd", str(ready_w), "--listen-port", str(self.s.listen_port),
                "--master-pid", str(os.getpid())]
        if self.config_path:
            argv += ["--config", self.config_path]
        if wait_routes:
            argv.append("--wait-routes")
        try:
            proc = subprocess.Popen(argv, pass_fds=(fd, ready_w))
        finally:
            os.close(ready_w)
        log.info("worker started", extra={"slot": slot, "worker_pid": proc.pid})
        return Worker(slot, proc, ready_r)

    def _wait_ready(self, workers: list[Worker], timeout: float) -> bool:
        """Until each worker wrote to its ready pipe (used at start only, before
        the loop runs); False when one closed it without (it died) or the time ran
        out."""
        deadline = time.monotonic() + timeout
        while True:
            state = self._poll_ready(workers, min(max(0.0, deadline - time.monotonic()), 0.5))
            if state is not None:
                return state
            if time.monotonic() >= deadline:
                return False

    def _poll_ready(self, workers: list[Worker], timeout: float) -> bool | None:
        """Read the ready pipes that have something within `timeout` seconds: True
        when every worker is ready, False when one closed its pipe without a word
        (it is exiting), None while some are still loading."""
        pending = {w.ready_fd: w for w in workers if not w.ready and w.ready_fd is not None}
        if pending:
            readable, _, _ = select.select(list(pending), [], [], timeout)
            for fd in readable:
                worker = pending[fd]
                data = os.read(fd, 64)
                os.close(fd)
                worker.ready_fd = None
                if not data:
                    return False
                worker.ready = True
        if all(w.ready for w in workers):
            return True
        if any(w.ready_fd is None and not w.ready for w in workers):
            return False
        return None

    def _terminate(self, workers: list[Worker]) -> None:
        now = time.monotonic()
        for worker in workers:
            if worker.retiring_since is None:
                worker.retiring_since = now
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        now = time.monotonic()
        limit = float(self.s.shutdown_timeout) + KILL_GRACE
        for worker in list(self.workers):
            code = worker.proc.poll()
            if code is None:
                if worker.retiring_since is not None and now - worker.retiring_since > limit:
                    log.warning("worker did not stop in time; killing it",
                                extra={"worker_pid": worker.pid})
                    worker.proc.kill()
                continue
            self.workers.remove(worker)
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
                worker.ready_fd = None
            if worker.retiring_since is not None:
                log.info("worker stopped", extra={"worker_pid": worker.pid,
                                                  "code": code})
                continue
            if self.reload is not None and worker in self.reload.new:
                continue        # _reload_step abandons the reload
            young = now - worker.started < YOUNG
            deaths = self.young_deaths[worker.slot] = \
                self.young_deaths.get(worker.slot, 0) + 1 if young else 0
            if code == SETTINGS or deaths >= MAX_YOUNG_DEATHS:
                self._fatal(worker, code, deaths)
                return
            # a crash: start it again, later the younger it died
            backoff = min(MAX_BACKOFF, self.backoff.get(worker.slot, 0.5) * 2) \
                if young else 0.5
            self.backoff[worker.slot] = backoff
            self.restart_at[worker.slot] = now + (backoff if young else 0.0)
            log.error("worker died; starting another", extra={
                "worker_pid": worker.pid, "code": code, "in_seconds": backoff})

    def _fatal(self, worker: Worker, code: int, deaths: int) -> None:
        """A worker that cannot run with these settings: say so once, stop the
        others and exit 2, rather than restart it in a loop."""
        why = ("it exited on a configuration error" if code == SETTINGS
               else f"it died {deaths} times in a row within {YOUNG:g} s of starting")
        log.error(f"worker FATAL: {why}; not restarting it, the balancer stops "
                  "(fix the settings and start it again)",
                  extra={"worker_pid": worker.pid, "slot": worker.slot, "code": code})
        self.exit_code = SETTINGS
        self._stop_all()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if now >= when and not self.stopping:
                del self.restart_at[slot]
                self.workers.append(self._spawn(slot, wait_routes=False))

    def _reap_all(self, timeout: float) -> None:
        for worker in self.workers:
            try:
                worker.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(5)
        self.workers = []
