"""A manifest per copy: every entry's type, mode, size and (files) sha256, streamed.

It is written last, beside the copy (`<copy>.manifest.json`: a read-only btrfs
snapshot cannot hold it), through a temporary file, fsync and rename, so a copy
without one is an interrupted copy. `verify(copy)` recomputes everything and, when it
matches, writes `<copy>.verified` (the manifest's own sha256): a copy is complete only
with that stamp, and only while the manifest is the one that was verified.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ManifestMismatch, ManifestMissing

log = logging.getLogger(__name__)

CHUNK = 1 << 20
VERSION = 1


def manifest_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".manifest.json")


def stamp_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".verified")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


Known = Callable[[str, os.stat_result, Path], "str | None"]
"""(relative path, lstat, full path) -> the file's sha256 when already known."""


def scan(copy: Path, known: Known | None = None) -> dict[str, dict[str, Any]]:
    """Every entry under `copy` (not following links), by relative path; a file whose
    sha256 `known` gives is not read."""
    entries: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(copy):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(copy).as_posix()
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                digest = known(rel, st, full) if known is not None else None
                entries[rel] = {"type": "file", "mode": mode, "size": st.st_size,
                                "sha256": digest or file_sha256(full)}
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = {"type": "dir", "mode": mode}
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = {"type": "symlink", "target": os.readlink(full)}
            else:
                entries[rel] = {"type": "other", "mode": mode}
    return entries


@dataclass(frozen=True)
class Written:
    path: Path
    files: int
    bytes: int
    seconds: float


def write(copy: Path) -> Written:
    started = time.monotonic()
    entries = scan(copy)
    body = {"version": VERSION, "copy": copy.name,
            "made": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "entries": entries}
    target = manifest_path(copy)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w") as f:
        json.dump(body, f, sort_keys=True, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, target)
    stamp_path(copy).unlink(missing_ok=True)
    files = [e for e in entries.values() if e["type"] == "file"]
    out = Written(target, len(files), sum(e["size"] for e in files),
                  time.monotonic() - started)
    log.info("manifest written", extra={"copy": str(copy), "files": out.files,
                                        "bytes": out.bytes, "seconds": round(out.seconds, 3)})
    return out


def verify(copy: Path, trusted: Path | None = None) -> int:
    """Recompute and compare; on success stamp the copy complete and return the count
    of files checked. Any difference raises ManifestMismatch naming the first few.

    `trusted`: a complete copy beside this one (the parent of an incremental pull, the
    link-dest of an rsync one). A file listed alike in both manifests whose data is
    the very same blocks on disk as the trusted copy's (the same inode: a hard link;
    the same physical extents: a btrfs clone, FIEMAP) is those verified bytes, and is
    not read again; every other file is hashed."""
    target = manifest_path(copy)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        raise ManifestMissing(f"copy {copy.name} has no manifest") from None
    expected = json.loads(raw)["entries"]
    reused = [0]
    known: Known | None = None
    if trusted is not None and trusted.parent == copy.parent and is_complete(trusted):
        before = json.loads(manifest_path(trusted).read_bytes())["entries"]

        def known(rel: str, st: os.stat_result, full: Path) -> str | None:
            old, new = before.get(rel), expected.get(rel)
            if not (old and old == new and old["type"] == "file" and
                    old["size"] == st.st_size and old["mode"] == stat.S_IMODE(st.st_mode)):
                return None
            if not same_blocks(trusted / rel, full, st):
                return None
            reused[0] += 1
            return str(old["sha256"])
    actual = scan(copy, known)
    problems = []
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            problems.append(f"{rel}: missing")
        elif rel not in expected:
            problems.append(f"{rel}: not in the manifest")
        elif actual[rel] != expected[rel]:
            what = "content" if actual[rel].get("sha256") != expected[rel].get("sha256") \
                else "metadata"
            problems.append(f"{rel}: {what} differs")
    if problems:
        stamp_path(copy).unlink(missing_ok=True)
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)"
                                           if len(problems) > 5 else "")
        raise ManifestMismatch(f"copy {copy.name} does not match its manifest: {shown}")
    stamp_path(copy).write_text(hashlib.sha256(raw).hexdigest() + "\n")
    files = sum(1 for e in actual.values() if e["type"] == "file")
    log.info("copy verified", extra={"copy": str(copy), "files": files,
                                     "shared_with_trusted": reused[0]})
    return files


def same_blocks(a: Path, b: Path, b_stat: os.stat_result) -> bool:
    """Whether regular files `a` and `b` (on one filesystem) hold their data in the
    very same blocks: one inode, or identical physical extents none of which is
    inline, delayed or of unknown place."""
    try:
        a_stat = a.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(a_stat.st_mode):
        return False
    if (a_stat.st_dev, a_stat.st_ino) == (b_stat.st_dev, b_stat.st_ino):
        return True
    if a_stat.st_size == 0:
        return False            # nothing to compare; hashing it costs nothing
    ea, eb = extents(a), extents(b)
    return bool(ea) and ea == eb


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
NOT_PLACED = 0x2 | 0x4 | 0x100 | 0x200 | 0x400   # unknown, delalloc, unaligned, inline, tail
_HEAD = struct.Struct("=QQLLLL")
_EXTENT = struct.Struct("=QQQQQLLLL")
BATCH = 128


def extents(path: Path) -> list[tuple[int, int, int]] | None:
    """(logical, physical, length) of every extent of `path` (FIEMAP, after a sync of
    the file), or None when the filesystem cannot say or an extent has no fixed
    place."""
    out: list[tuple[int, int, int]] = []
    start = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        while True:
            buf = bytearray(_HEAD.pack(start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
                            + bytes(_EXTENT.size * BATCH))
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            except OSError:
                return None
            mapped = _HEAD.unpack_from(buf)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                logical, physical, length, _, _, flags, *_ = \
                    _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
                if flags & NOT_PLACED:
                    return None
                out.append((logical, physical, length))
                if flags & FIEMAP_EXTENT_LAST:
                    return out
            start = out[-1][0] + out[-1][2]
    finally:
        os.close(fd)


def is_complete(copy: Path) -> bool:
    """Verified, against the manifest that is there now."""
    try:
        raw = manifest_path(copy).read_bytes()
        stamp = stamp_path(copy).read_text().strip()
    except FileNotFoundError:
        return False
    return stamp == hashlib.sha256(raw).hexdigest()
