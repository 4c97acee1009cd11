"""Per-instance memory and process-count limits with cgroups, v2 or v1.

Every group lives under berth/<scope>/<app>/<instance>; the scope is one runner, so
several runners on one machine never touch each other's groups. Only the leaves
(instances) hold processes: v2 will not hand controllers down from a group that holds
processes of its own, so berth, the scope and the app stay empty.

v2 (production hosts): one tree; memory and pids are switched on in the
cgroup.subtree_control of every ancestor, limits go to memory.max, memory.swap.max
and pids.max. v1 (hybrid hosts, such as the test machine): one tree per controller,
memory/ and pids/, each with its own cgroup.procs; memory.memsw.limit_in_bytes is set
equal to the memory limit so an instance cannot spill into swap.

A process joins its group before it runs any code of its own: the spawned shell
writes its pid into every file of `InstanceGroup.procs_files` and then execs, so the
instance and all it forks are limited from the first instruction.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import LimitError

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
KILL_TIMEOUT = 5.0      # SIGKILL rounds until a group is empty
RMDIR_TIMEOUT = 2.0     # a group emptied a moment ago can still be busy
STEP = 0.02

_HINTS = {
    errno.EACCES: "run the runner as root, or delegate the berth cgroup subtree to its user",
    errno.EPERM: "run the runner as root, or delegate the berth cgroup subtree to its user",
    errno.EROFS: "the cgroup filesystem is mounted read-only (a container without "
                 "cgroup delegation?)",
    errno.EINVAL: "the value is out of range for this kernel, or on v1 the memory+swap "
                  "limit would fall below the memory limit",
    errno.EBUSY: "the group uses more memory than the new limit, or still holds processes",
    errno.ENOENT: "the controller is not available in this group: check the parent's "
                  "cgroup.subtree_control (v2) or the controller's mount (v1)",
    errno.ESRCH: "the process exited before it could join its group",
}


@dataclass(frozen=True)
class Limits:
    memory_bytes: int   # 0 = unlimited
    pids: int           # 0 = unlimited

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.pids < 0:
            raise LimitError(f"limits cannot be negative: memory_bytes={self.memory_bytes}, "
                             f"pids={self.pids}", "use 0 for no limit")


def _error(action: str, path: Path, exc: OSError) -> LimitError:
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    hint = _HINTS.get(code, "check the cgroup mounts under /sys/fs/cgroup and the kernel log")
    return LimitError(f"could not {action} {path}: {os.strerror(code)} ({name})", hint)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as fh:     # one write(2): cgroup files take one value per write
            fh.write(value)
    except OSError as exc:
        raise _error(f"write {value!r} to", path, exc) from exc


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise _error("create the cgroup", path, exc) from exc


def _rmdir(path: Path) -> None:
    """rmdir, waiting a little while the kernel still counts a just-killed process."""
    deadline = time.monotonic() + RMDIR_TIMEOUT
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error("remove the cgroup", path, exc) from exc
            time.sleep(STEP)


def _keyed(path: Path) -> dict[str, int]:
    """`key value` lines, as in memory.events and memory.oom_control."""
    pairs = (line.split() for line in path.read_text().splitlines())
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


def _subdirs(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()


def _check_name(kind: str, name: str) -> None:
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise LimitError(f"{kind} name {name!r} cannot name a cgroup",
                         "use a plain name: no '/', no leading '.'")


def _detect(root: Path) -> tuple[int | None, list[Path], str]:
    """(version, one base dir per controller tree, why unusable)."""
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        version, bases = 2, [root]
        missing = set(CONTROLLERS) - set(controllers.read_text().split())
        if missing:
            return None, bases, f"the cgroup v2 tree at {root} does not offer " \
                                f"{' and '.join(sorted(missing))}"
    else:
        version, bases = 1, [root / c for c in CONTROLLERS]
        absent = [str(b) for b in bases if not (b / "cgroup.procs").exists()]
        if absent:
            return None, bases, f"no cgroup v2 tree at {root} and no v1 controller " \
                                f"mounted at {', '.join(absent)}"
    locked = [str(b) for b in bases if not os.access(b, os.W_OK)]
    if locked:
        return None, bases, f"{', '.join(locked)} is not writable (the runner is not " \
                            "root, or the cgroup filesystem is read-only)"
    return version, bases, ""


class InstanceGroup:
    """One instance's group: a directory per controller on v1, one directory on v2."""

    def __init__(self, dirs: list[Path], version: int) -> None:
        self.dirs = dirs
        self.version = version

    @property
    def procs_files(self) -> list[Path]:
        """The file(s) a new process writes its own pid into before it execs."""
        return [d / "cgroup.procs" for d in self.dirs]

    def add(self, pid: int) -> None:
        for procs in self.procs_files:
            _write(procs, str(pid))

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended because of this group's limit."""
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(self.dirs[0] / events).get("oom_kill", 0)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            if procs.exists():
                found.update(int(word) for word in procs.read_text().split())
        return sorted(found)

    def kill_all(self) -> None:
        """SIGKILL until the group is empty: a process may fork between our read of
        cgroup.procs and its kill, so repeat. v2 kernels from 5.14 kill the whole group
        in one write to cgroup.kill; v1 does without the freezer, as pids.max bounds
        how many a fork loop can make per round."""
        deadline = time.monotonic() + KILL_TIMEOUT
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise LimitError(f"processes {pids} are still in {self.dirs[0]} after "
                                 f"{KILL_TIMEOUT:.0f} s of SIGKILL",
                                 "a process stuck in uninterruptible I/O (state D) cannot "
                                 "die; look at /proc/<pid>/stack and retry later")
            kill = self.dirs[0] / "cgroup.kill"
            if self.version == 2 and kill.exists():
                _write(kill, "1")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(STEP)

    def remove(self) -> None:
        """Kill what is left and remove the group; removing twice is fine."""
        self.kill_all()
        for d in self.dirs:
            _rmdir(d)


class Cgroups:
    """Detects v2 or v1 at construction; every group lives under
    berth/<scope>/<app>/<instance>."""

    def __init__(self, scope: str, root: Path = Path("/sys/fs/cgroup")) -> None:
        _check_name("scope", scope)
        self.scope = scope
        self.root = root
        self._version, self._bases, self._why = _detect(root)

    @property
    def version(self) -> int | None:
        """2, 1, or None when cgroups cannot be used here (see why_unavailable)."""
        return self._version

    def why_unavailable(self) -> str:
        return self._why

    def create(self, app: str, instance: str, limits: Limits) -> InstanceGroup:
        """Make (or re-limit) the instance's group and its parents."""
        version = self._usable()
        _check_name("app", app)
        _check_name("instance", instance)
        for base in self._bases:
            chain = [base, base / "berth", base / "berth" / self.scope,
                     base / "berth" / self.scope / app]
            for parent in chain:
                _mkdir(parent)
                if version == 2:
                    self._enable_controllers(parent)
        group = self._group(app, instance)
        fresh = not any(d.exists() for d in group.dirs)
        for d in group.dirs:
            _mkdir(d)
        try:
            if version == 2:
                self._limit_v2(group.dirs[0], limits)
            else:
                self._limit_v1(group.dirs[0], group.dirs[1], limits)
        except LimitError:
            if fresh:
                group.remove()
            raise
        log.debug("cgroup ready", extra={"app": app, "instance": instance,
                                         "memory": limits.memory_bytes, "pids": limits.pids})
        return group

    def remove_app(self, app: str) -> None:
        """Kill what is left in the app's groups and remove them, leaves first."""
        version = self._usable()
        _check_name("app", app)
        app_dirs = [base / "berth" / self.scope / app for base in self._bases]
        for instance in sorted(set().union(*map(_subdirs, app_dirs))):
            self._group(app, instance).remove()
        InstanceGroup(app_dirs, version).remove()

    def remove_scope(self) -> None:
        """Remove this platform's (empty) scope groups once no app has one left."""
        for base in self._bases:
            try:
                (base / "berth" / self.scope).rmdir()
            except OSError:
                pass        # gone already, or an app still has a group in it

    def apps(self) -> list[str]:
        """Apps with a group under this scope, such as those a killed runner left."""
        if self._version is None:
            return []
        return sorted(set().union(*(_subdirs(b / "berth" / self.scope) for b in self._bases)))

    def _usable(self) -> int:
        if self._version is None:
            raise LimitError(f"cgroup limits are unavailable: {self._why}",
                             "run the runner as root on a host with cgroup v2, or with the "
                             "v1 memory and pids controllers mounted under /sys/fs/cgroup")
        return self._version

    def _group(self, app: str, instance: str) -> InstanceGroup:
        version = self._usable()
        return InstanceGroup([b / "berth" / self.scope / app / instance for b in self._bases],
                             version)

    @staticmethod
    def _enable_controllers(parent: Path) -> None:
        control = parent / "cgroup.subtree_control"
        enabled = control.read_text().split() if control.exists() else []
        missing = [c for c in CONTROLLERS if c not in enabled]
        if missing:
            _write(control, " ".join(f"+{c}" for c in missing))

    @staticmethod
    def _limit_v2(group: Path, limits: Limits) -> None:
        _write(group / "memory.max", str(limits.memory_bytes or "max"))
        if (group / "memory.swap.max").exists():    # absent without swap accounting
            _write(group / "memory.swap.max", "0" if limits.memory_bytes else "max")
        _write(group / "pids.max", str(limits.pids or "max"))

    @staticmethod
    def _limit_v1(memory: Path, pids: Path, limits: Limits) -> None:
        value = str(limits.memory_bytes or -1)
        files = [memory / "memory.limit_in_bytes"]
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():      # absent without swap accounting
            # The kernel keeps memsw >= limit (EINVAL otherwise): when raising, memsw
            # moves first; when lowering, it moves last.
            current = int(files[0].read_text())
            raising = not limits.memory_bytes or limits.memory_bytes > current
            files = [memsw, *files] if raising else [*files, memsw]
        for path in files:
            _write(path, value)
        _write(pids / "pids.max", str(limits.pids or "max"))
