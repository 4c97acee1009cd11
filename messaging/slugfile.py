"""The rules for unpacking a slug, shared by the controller (which checks a push
before storing it) and the runner (which unpacks it): a slug is the one artifact
besides messages that crosses between hosts, so its rules live beside the protocol.

Python 3.11.4+ has tarfile's "data" filter; Debian 12 ships 3.11.2 without it, so the
same rules are also applied by hand: no absolute paths, no `..`, links only to
places inside the app, only files, directories and links, no owners from the
archive, no setuid/setgid/sticky bits and no group/other write.
"""
from __future__ import annotations

import copy
import tarfile
from pathlib import Path, PurePosixPath


def _normalize(path: PurePosixPath) -> PurePosixPath | None:
    """Resolve `..` lexically; None when it climbs above the root."""
    parts: list[str] = []
    for part in path.parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return PurePosixPath(*parts)


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why this member must not be unpacked, or None when it is fine."""
    name = PurePosixPath(member.name)
    if name.is_absolute():
        return "is an absolute path, outside the app"
    if ".." in name.parts:
        return "climbs outside the app with `..`"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        if target.is_absolute() or _normalize(base / target) is None:
            return f"is a link to {member.linkname!r}, outside the app"
    elif not (member.isfile() or member.isdir()):
        return "is not a file, directory or link (a device or fifo)"
    return None


def extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Unpack every member under the rules above; raises ValueError naming a bad one."""
    members = []
    for member in archive.getmembers():
        problem = member_problem(member)
        if problem:
            raise ValueError(f"{member.name!r} {problem}")
        clean = copy.copy(member)
        clean.uid = clean.gid = 0
        clean.uname = clean.gname = ""
        clean.mode = member.mode & (0o755 if member.isdir() or member.mode & 0o100 else 0o644)
        members.append(clean)
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, members=members, filter="data")
        return
    archive.chown = lambda *args, **kwargs: None      # type: ignore[method-assign]
    archive.extractall(dest, members=members)
