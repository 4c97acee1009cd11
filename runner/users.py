"""One system user per app, so the kernel keeps apps apart by uid.

Users are named `b<scope>-<app>` (scope: a few characters the caller derives from its
platform, so two platforms on one machine never share a user) and carry
`berth app <app> (<scope>)` in their GECOS field, which is what says whose they are.
Uids, and the same-numbered group of each user, come from one declared range so the
firewall can match every app with a single `meta skuid MIN-MAX`.

useradd/userdel do the writing: they hold the locks on /etc/passwd and /etc/group, so
several runners on one machine can add users at once; one that loses the race for a
uid gets "UID ... is not unique" (exit 4) and tries the next free one.
"""
from __future__ import annotations

import grp
import hashlib
import logging
import pwd
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import IsolationError

log = logging.getLogger(__name__)

APP_PATTERN = r"[a-z][a-z0-9-]{0,28}[a-z0-9]"
APP_NAME = re.compile(rf"^{APP_PATTERN}$")
SCOPE = re.compile(r"^[a-z0-9]{1,8}$")
NAME_MAX = 32               # what useradd (and utmp) accept
HASH_LEN = 8
SHELL = "/usr/sbin/nologin"
ATTEMPTS = 8                # uid races lost, or passwd-file locks busy, before giving up
TIMEOUT = 60.0
EXIT_NOT_UNIQUE = 4         # useradd: uid (or gid) already taken
EXIT_NAME_TAKEN = 9         # useradd: user or group name already taken
EXIT_LOCKED = 10            # useradd/userdel: cannot lock the passwd or group file
EXIT_BUSY = 8               # userdel: the user still has processes


@dataclass(frozen=True)
class AppUser:
    name: str
    uid: int
    gid: int
    app: str


class AppUsers:
    """Each app gets its own system user (no login shell, no home made outside the
    app dir), uids taken from a declared range so the kernel firewall can match every
    app by uid range."""

    def __init__(self, scope: str, uid_min: int = 200000, uid_max: int = 299999) -> None:
        if not SCOPE.match(scope):
            raise IsolationError(f"user scope {scope!r} is not 1-8 of [a-z0-9]",
                                 "derive the scope from a hex digest")
        if not 1000 <= uid_min <= uid_max < 2**31 - 1:
            raise IsolationError(f"app uid range {uid_min}-{uid_max} is not valid",
                                 "set app_uid_min <= app_uid_max, both above 1000 and "
                                 "clear of the machine's own users (default "
                                 "200000-299999)")
        self.scope = scope
        self.uid_min = uid_min
        self.uid_max = uid_max
        self._lock = threading.Lock()

    # ---- naming ----------------------------------------------------------------
    def name_for(self, app: str) -> str:
        """`b<scope>-<app>`, or, when that is over 32 characters, the app name cut and
        followed by `_<hash of the whole name>`. App names have no `_`, so a cut name
        never equals an uncut one, and the hash keeps two cut names apart."""
        _check_app(app)
        prefix = f"b{self.scope}-"
        name = prefix + app
        if len(name) <= NAME_MAX:
            return name
        digest = hashlib.sha256(app.encode()).hexdigest()[:HASH_LEN]
        keep = NAME_MAX - len(prefix) - 1 - HASH_LEN
        return f"{prefix}{app[:keep]}_{digest}"

    def _gecos(self, app: str) -> str:
        return f"berth app {app} ({self.scope})"

    # ---- reading ---------------------------------------------------------------
    def get(self, app: str) -> AppUser | None:
        """The app's user, or None. A user of that name that is not this app's (other
        GECOS, or a uid outside the range) is an error, never silently adopted."""
        name = self.name_for(app)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        if entry.pw_gecos != self._gecos(app) or not self._in_range(entry.pw_uid):
            raise IsolationError(
                f"system user {name} exists but is not app {app!r}'s "
                f"(uid {entry.pw_uid}, comment {entry.pw_gecos!r})",
                f"remove or rename that user (userdel {name}), or set another uid "
                f"range / apps_dir")
        return AppUser(name, entry.pw_uid, entry.pw_gid, app)

    def apps(self) -> list[str]:
        """Apps that have a user in this scope, read from each user's GECOS."""
        mark = re.compile(rf"^berth app ({APP_PATTERN}) \({self.scope}\)$")
        found = []
        for entry in pwd.getpwall():
            match = mark.match(entry.pw_gecos)
            if match and self._in_range(entry.pw_uid) \
                    and entry.pw_name == self.name_for(match.group(1)):
                found.append(match.group(1))
        return sorted(found)

    # ---- writing ---------------------------------------------------------------
    def ensure(self, app: str, home: Path) -> AppUser:
        """The app's user, made on first call. `home` is recorded, never created:
        the caller makes it (owned by the user) inside the app's directory."""
        with self._lock:
            existing = self.get(app)
            if existing is not None:
                return existing
            name = self.name_for(app)
            last = ""
            for attempt in range(ATTEMPTS):
                uid = self._free_uid()
                result = self._run(self._useradd(app, name, uid, home))
                if result.returncode == 0:
                    user = self.get(app)
                    if user is None:
                        raise IsolationError(f"useradd made {name} but it cannot be "
                                             "read back", "check /etc/nsswitch.conf")
                    log.info("app user created", extra={"app": app, "user": name,
                                                        "uid": user.uid})
                    return user
                last = result.stderr.strip()
                raced = self.get(app) if result.returncode == EXIT_NAME_TAKEN else None
                if raced is not None:       # another process made this very user
                    return raced
                if result.returncode not in (EXIT_NOT_UNIQUE, EXIT_LOCKED):
                    break
                time.sleep(0.05 * (attempt + 1))    # another runner won the uid or lock
            raise IsolationError(f"cannot create the system user {name} for app "
                                 f"{app!r}: {last}",
                                 "the runner must be root; check the uid range is not "
                                 "full and /etc/passwd is writable")

    def remove(self, app: str) -> bool:
        """Delete the app's user and its group; True if the user existed. The app's
        processes must have ended first (userdel refuses a busy user)."""
        with self._lock:
            user = self.get(app)
            if user is None:
                return False
            self._checked(["userdel", user.name], f"delete the system user {user.name}",
                          busy_hint="stop the app's processes first")
            try:
                group = grp.getgrnam(user.name)
            except KeyError:
                return True
            if group.gr_gid == user.gid:    # userdel keeps a group that has members
                self._checked(["groupdel", user.name],
                              f"delete the group {user.name}")
            log.info("app user removed", extra={"app": app, "user": user.name})
            return True

    # ---- internals -------------------------------------------------------------
    def _in_range(self, uid: int) -> bool:
        return self.uid_min <= uid <= self.uid_max

    def _free_uid(self) -> int:
        """Lowest uid in range that is neither a uid nor a gid, so the user's group
        gets the same number; failing that, the lowest free uid."""
        uids = {e.pw_uid for e in pwd.getpwall()}
        gids = {g.gr_gid for g in grp.getgrall()}
        free_uid = None
        for uid in range(self.uid_min, self.uid_max + 1):
            if uid in uids:
                continue
            if uid not in gids:
                return uid
            if free_uid is None:
                free_uid = uid
        if free_uid is None:
            raise IsolationError(f"no free uid left in {self.uid_min}-{self.uid_max}",
                                 "widen the runner's app uid range or destroy "
                                 "unused apps")
        return free_uid

    def _useradd(self, app: str, name: str, uid: int, home: Path) -> list[str]:
        # -K moves useradd's system range onto ours: the group made by -U then takes
        # gid == uid (or another gid in range), not one of the few below 1000.
        keys = [f"SYS_UID_MIN={self.uid_min}", f"SYS_UID_MAX={self.uid_max}",
                f"SYS_GID_MIN={self.uid_min}", f"SYS_GID_MAX={self.uid_max}"]
        argv = ["useradd", "--system"]
        for key in keys:
            argv += ["-K", key]
        argv += ["-u", str(uid)]
        argv += self._group_args(name)
        argv += ["-M", "-d", str(home), "-s", SHELL, "-c", self._gecos(app), name]
        return argv

    def _group_args(self, name: str) -> list[str]:
        """`-U`, or `-g NAME` when a removal that was cut short left the group."""
        try:
            group = grp.getgrnam(name)
        except KeyError:
            return ["-U"]
        if not self._in_range(group.gr_gid) or group.gr_mem:
            raise IsolationError(f"group {name} exists and is not a leftover of an app "
                                 f"user (gid {group.gr_gid}, members {group.gr_mem})",
                                 f"remove it (groupdel {name})")
        return ["-g", name]

    @staticmethod
    def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IsolationError(f"cannot run {argv[0]}: {exc}",
                                 "install passwd (useradd, userdel, groupdel) and run "
                                 "the runner as root") from exc

    def _checked(self, argv: list[str], what: str, busy_hint: str = "") -> None:
        """Run userdel/groupdel, waiting out a passwd-file lock held by another."""
        result = self._run(argv)
        for attempt in range(ATTEMPTS):
            if result.returncode != EXIT_LOCKED:
                break
            time.sleep(0.05 * (attempt + 1))
            result = self._run(argv)
        if result.returncode == 0:
            return
        hint = busy_hint if result.returncode == EXIT_BUSY and busy_hint else \
            "the runner must be root"
        raise IsolationError(f"cannot {what}: {result.stderr.strip()}", hint)


def _check_app(app: str) -> None:
    if not APP_NAME.match(app):
        raise IsolationError(f"app name {app!r} is not valid",
                             "app names are 2-30 of a-z, 0-9 and -, starting with a "
                             "letter and not ending with -")
