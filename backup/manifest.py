"""A manifest per copy: every entry's type, mode, size and (files) sha256, streamed.

It is written last, beside the copy (`<copy>.manifest.json`: a read-only btrfs
snapshot cannot hold it), through a temporary file, fsync and rename, so a copy
without one is an interrupted copy. `verify(copy)` recomputes everything and, when it
matches, writes `<copy>.verified` (the manifest's own sha256): a copy is complete only
with that stamp, and only while the manifest is the one that was verified.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
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


def scan(copy: Path) -> dict[str, dict[str, Any]]:
    """Every entry under `copy` (not following links), by relative path."""
    entries: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(copy):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(copy).as_posix()
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                entries[rel] = {"type": "file", "mode": mode, "size": st.st_size,
                                "sha256": file_sha256(full)}
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


def verify(copy: Path) -> int:
    """Recompute and compare; on success stamp the copy complete and return the count
    of files checked. Any difference raises ManifestMismatch naming the first few."""
    target = manifest_path(copy)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        raise ManifestMissing(f"copy {copy.name} has no manifest") from None
    expected = json.loads(raw)["entries"]
    actual = scan(copy)
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
    log.info("copy verified", extra={"copy": str(copy), "files": files})
    return files


def is_complete(copy: Path) -> bool:
    """Verified, against the manifest that is there now."""
    try:
        raw = manifest_path(copy).read_bytes()
        stamp = stamp_path(copy).read_text().strip()
    except FileNotFoundError:
        return False
    return stamp == hashlib.sha256(raw).hexdigest()
