"""Directories and files that belong to a server's own system user.

Servers (postgres, redis-server) do not run as root: their data dirs are theirs, mode
0700, and every directory above must let them pass (o+x). Files Berth writes for them
(configs, pg_hba.conf, ACL files) are written beside the target and renamed over it,
so a server reloading at that moment never reads half a file.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .command import RunAs
from .errors import UnsafePath

SOCKET_PATH_MAX = 107       # sun_path holds 108 bytes with the terminating NUL


def own_dir(path: Path, owner: RunAs, mode: int = 0o700) -> Path:
    """Make `path` (and its missing parents, 0711) a directory of `owner`."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o711)
    path.mkdir(mode=mode, exist_ok=True)
    if not owner.is_self:
        os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)
    check_reachable(path.parent, owner)
    return path


def check_reachable(path: Path, user: RunAs) -> None:
    """Raise UnsafePath unless `user` can pass through every directory down to `path`."""
    if user.is_self or os.geteuid() != 0:
        return
    path = path.resolve()
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == user.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == user.gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise UnsafePath(f"{user.name} cannot reach {path}: {directory} does not let "
                             f"others pass", f"chmod o+x {directory}, or choose a data dir "
                             f"outside it (servers run as {user.name}, not root)")


def write_file(path: Path, text: str, owner: RunAs, mode: int = 0o600) -> None:
    """Write `text` to `path` atomically, owned by `owner`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if not owner.is_self:
            os.chown(tmp, owner.uid, owner.gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise UnsafePath(f"the unix socket path {path} is longer than {SOCKET_PATH_MAX} "
                         "bytes", "choose a shorter data dir for the provisioner")
