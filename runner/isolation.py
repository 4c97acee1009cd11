"""What walls one app off from another on this host, behind one switch.

With isolation on (the default when the runner is root) every app has its own system
user (runner/users.py), its files live in `<apps_dir>/<app>/` owned by that user with
mode 0700, every command of the app (unpacking its slug, building its virtualenv,
running its processes) runs in a jail (runner/jail.py) as that user, each instance in
its own cgroup with memory and process-count limits (runner/cgroups.py), and the
kernel refuses the app's connections to loopback services (runner/firewall.py: an
nftables owner match on the app uid range), so it reaches neither other apps'
instance ports nor the platform's ZeroMQ and API ports.

Layout of one app (all of it the app's user's, 0700 at the top):
    <apps_dir>/<app>/releases/<sha>/   unpacked slugs, written by the app's user
    <apps_dir>/<app>/venvs/<key>/      its virtualenvs (never shared with another app)
    <apps_dir>/<app>/data/             persistent data (BERTH_DATA_DIR), writable at run
    <apps_dir>/<app>/cache/            pip's cache and HOME during builds
The platform's own files (runner data dir: slugs, logs, instance dirs, tokens) stay
root's, 0700. Logs are written by the runner, so they stay root's too: an app cannot
read another's logs, nor rewrite the platform's record of its own.

When the runner is not root, or isolation is "off", it says so once, loudly, and
apps run as the runner's user with none of the above.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from runner.cgroups import Cgroups, InstanceGroup, Limits
from runner.errors import IsolationError
from runner.firewall import Firewall
from runner.jail import Jail
from runner.users import AppUser, AppUsers

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
TOOLS = ("bwrap", "setpriv", "nft", "useradd", "userdel")
NOBODY = 65534
PRIVATE = (Path("/tmp"), Path("/dev/shm"))      # each jail gets its own


def scope_for(apps_dir: Path) -> str:
    """Two platforms on one machine (tests, a demo beside them) never share a user or
    a cgroup: both are named by a short hash of the apps dir."""
    return hashlib.sha256(str(apps_dir).encode()).hexdigest()[:4]


@dataclass(frozen=True)
class AppPaths:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


class InstanceJail:
    """One instance's jail and cgroup; a plain pass-through when isolation is off."""

    def __init__(self, jail: Jail | None, group: InstanceGroup | None,
                 limits: Limits) -> None:
        self.jail = jail
        self.group = group
        self.limits = limits

    def argv(self, command: list[str]) -> list[str]:
        return self.jail.argv(command) if self.jail else list(command)

    def oom_kills(self) -> int:
        return self.group.oom_kills() if self.group else 0

    def remove(self) -> None:
        if self.group is not None:
            self.group.remove()

    @property
    def isolated(self) -> bool:
        return self.jail is not None


class Isolation:
    def __init__(self, settings: SimpleNamespace, apps_dir: Path) -> None:
        if settings.isolation not in MODES:
            raise IsolationError(f"runner setting isolation = {settings.isolation!r} is "
                                 f"not one of {', '.join(MODES)}",
                                 "use auto (on when the runner is root), on or off")
        self.apps_dir = apps_dir
        self.enabled = settings.isolation == "on" or (
            settings.isolation == "auto" and os.geteuid() == 0)
        self.scope = scope_for(apps_dir)
        self.users = AppUsers(self.scope, settings.app_uid_min, settings.app_uid_max)
        self.cgroups = Cgroups(self.scope)
        self.firewall = Firewall(settings.app_uid_min, settings.app_uid_max)
        self.defaults = Limits(settings.memory_mb << 20, settings.pids_max)

    # ---- start: check every part before taking work --------------------------
    def start(self) -> None:
        self.apps_dir.mkdir(parents=True, exist_ok=True)
        if not self.enabled:
            why = ("the runner is not root" if os.geteuid() != 0
                   else "the runner setting isolation is off")
            log.warning("ISOLATION IS OFF (%s): every app runs as uid %d, can read the "
                        "others' files and environment and reach the platform's ports; "
                        "run the runner as root for per-app users, jails, cgroups and "
                        "the firewall", why, os.geteuid())
            return
        if os.geteuid() != 0:
            raise IsolationError("runner setting isolation = on needs the runner to run "
                                 "as root", "run it as root, or set isolation to auto")
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise IsolationError(f"isolation needs {', '.join(missing)}, not found",
                                 "install them: apt-get install bubblewrap nftables "
                                 "util-linux passwd (scripts/setup.sh does)")
        ok, why = self.firewall.available()
        if not ok:
            raise IsolationError(f"the firewall cannot be set up: {why}",
                                 "check that nftables works (nft list ruleset)")
        if self.cgroups.version is None:
            raise IsolationError(f"cgroups are unusable: {self.cgroups.why_unavailable()}",
                                 "mount cgroup v2, or v1 memory and pids controllers")
        self.firewall.ensure()
        self.apps_dir.chmod(0o711)
        self._check_reachable()
        self._probe()
        log.info("isolation on", extra={"cgroups": f"v{self.cgroups.version}",
                                        "scope": self.scope, "apps_dir": str(self.apps_dir)})

    def _check_reachable(self) -> None:
        """App users must be able to walk down to their own directory, and it must
        not be under what every jail replaces with a private tmpfs."""
        for hidden in PRIVATE:
            if self.apps_dir == hidden or hidden in self.apps_dir.parents:
                raise IsolationError(
                    f"apps_dir {self.apps_dir} is under {hidden}, which every app jail "
                    "replaces with a private one",
                    "set the runner's apps_dir (BERTH_RUNNER_APPS_DIR) elsewhere, e.g. "
                    "/var/lib/berth/apps or /var/tmp/berth-apps")
        for path in (self.apps_dir, *self.apps_dir.parents):
            mode = path.stat().st_mode
            if not mode & stat.S_IXOTH:
                raise IsolationError(
                    f"app users cannot reach {self.apps_dir}: {path} is mode "
                    f"{stat.S_IMODE(mode):04o} (others may not traverse it)",
                    "set the runner's apps_dir (BERTH_RUNNER_APPS_DIR) to a directory "
                    "whose parents all allow others to traverse them (o+x), e.g. "
                    "/var/lib/berth/apps, or run Berth from a clone outside /root")

    def _probe(self) -> None:
        """The unpacker and virtualenv run as the app's user: check that an
        unprivileged user can start them from where Berth is installed."""
        jail = Jail(NOBODY, NOBODY, cwd=Path("/"))
        code = "import runner.unpack, virtualenv"
        try:
            subprocess.run(jail.argv([sys.executable, "-c", code]), check=True,
                           capture_output=True, text=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            stderr = exc.stderr if isinstance(exc.stderr, str) else "timed out after 60s"
            raise IsolationError(
                f"an unprivileged user cannot run Berth's code with {sys.executable}: "
                f"{stderr.strip()[-300:]}",
                "install Berth where every user can read it (e.g. clone it outside "
                "/root, or chmod o+rx the path to it)") from exc

    # ---- per app ---------------------------------------------------------------
    def paths(self, app: str) -> AppPaths:
        return AppPaths(self.apps_dir / app)

    def user(self, app: str) -> AppUser | None:
        return self.users.get(app) if self.enabled else None

    def ensure_app(self, app: str) -> tuple[AppPaths, AppUser | None]:
        """The app's user and directories, made on first use (idempotent)."""
        paths = self.paths(app)
        user = self.users.ensure(app, paths.data) if self.enabled else None
        for path in (paths.root, paths.releases, paths.venvs, paths.data, paths.cache):
            path.mkdir(exist_ok=True)
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                raise IsolationError(f"{path} is not a directory",
                                     "destroy the app and push it again")
            if user is not None and (info.st_uid, info.st_gid) != (user.uid, user.gid):
                os.chown(path, user.uid, user.gid, follow_symlinks=False)
        paths.root.chmod(0o700)
        return paths, user

    def wrap(self, app: str, command: list[str], writable: tuple[Path, ...] = (),
             cwd: Path | None = None) -> list[str]:
        """`command` as the app's user in its jail (unchanged when isolation is off)."""
        user = self.user(app)
        if user is None:
            return list(command)
        return Jail(user.uid, user.gid, writable, cwd=cwd).argv(command)

    def wrap_fetch(self, command: list[str], writable: tuple[Path, ...] = ()) -> list[str]:
        """The wheel download runs no package code, but needs no privilege either:
        it runs as `nobody`, writing only its staging dir."""
        if not self.enabled:
            return list(command)
        return Jail(NOBODY, NOBODY, writable).argv(command)

    def fetch_owner(self) -> tuple[int, int] | None:
        return (NOBODY, NOBODY) if self.enabled else None

    def instance(self, app: str, instance: str, limits: Limits | None = None
                 ) -> InstanceJail:
        """A fresh jail + cgroup for one spawn of an instance."""
        limits = limits or self.defaults
        user = self.user(app)
        if user is None:
            return InstanceJail(None, None, limits)
        group = self.cgroups.create(app, instance, limits)
        paths = self.paths(app)
        jail = Jail(user.uid, user.gid, (paths.data,), tuple(group.procs_files))
        return InstanceJail(jail, group, limits)

    def destroy(self, app: str) -> None:
        """Every file, cgroup and the user of an app on this host."""
        if self.enabled:
            self.cgroups.remove_app(app)
        shutil.rmtree(self.paths(app).root, ignore_errors=True)
        if self.enabled:
            self.users.remove(app)

    def apps(self) -> list[str]:
        """Apps that have anything on this host (files, a user, cgroups)."""
        found = {p.name for p in self.apps_dir.iterdir() if p.is_dir()} \
            if self.apps_dir.is_dir() else set()
        if self.enabled:
            found |= set(self.users.apps()) | set(self.cgroups.apps())
        return sorted(found)
