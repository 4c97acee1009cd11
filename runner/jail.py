"""The command line that runs something as an app's own user, walled off.

Measured here as root: bubblewrap gives the process its own PID namespace (it sees
only its own processes), a read-only view of the whole system, a private /tmp and
/dev/shm, and only the directories we name writable; `setpriv` then drops to the
app's uid/gid with no supplementary groups, no capabilities (inheritable and bounding
sets cleared) and no_new_privs, so a setuid binary cannot raise it again. A tiny `sh`
trampoline first writes its own pid into the instance's cgroup(s), so the memory and
process-count limits hold from the first instruction of bwrap on, then `exec`s.

We use bwrap + setpriv (Debian's bubblewrap and util-linux) rather than hand-made
namespace code: both are small, audited and do exactly this.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# argv[1] = how many cgroup.procs files follow; each gets this shell's pid, then exec
TRAMPOLINE = ('n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; '
              'shift; n=$((n - 1)); done; exec "$@"')


@dataclass(frozen=True)
class Jail:
    """Who a command runs as and what it may write."""
    uid: int
    gid: int
    writable: tuple[Path, ...] = ()
    cgroup_procs: tuple[Path, ...] = field(default=())
    cwd: Path | None = None

    def argv(self, command: list[str]) -> list[str]:
        bwrap = ["bwrap", "--unshare-pid", "--unshare-ipc",
                 "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/dev/shm"]
        bwrap += _code_binds()
        for path in self.writable:
            bwrap += ["--bind", str(path), str(path)]
        if self.cwd is not None:
            bwrap += ["--chdir", str(self.cwd)]
        bwrap += ["--", "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                  "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                  "--no-new-privs", *command]
        if not self.cgroup_procs:
            return bwrap
        return ["sh", "-c", TRAMPOLINE, "berth-jail", str(len(self.cgroup_procs)),
                *map(str, self.cgroup_procs), *bwrap]


def _code_binds() -> list[str]:
    """Berth's own code (the unpacker, virtualenv) runs in jails too: when it is
    installed under /tmp, which every jail replaces, bind it back in, read-only, with
    directories on the way that the app's user may pass."""
    out: list[str] = []
    tmp = Path("/tmp")
    for root in sorted({Path(sys.prefix).resolve(), Path(__file__).resolve().parents[1]}):
        if tmp not in root.parents:
            continue
        for parent in reversed(root.parents):
            if tmp in parent.parents:
                out += ["--perms", "0755", "--dir", str(parent)]
        out += ["--ro-bind", str(root), str(root)]
    return out


def plain(command: list[str]) -> list[str]:
    """The same command with no jail: what a runner that is not root runs."""
    return list(command)
