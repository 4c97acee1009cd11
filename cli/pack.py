"""Packing an app directory for a push, honouring .gitignore.

pathspec implements git's ignore rules faithfully (negations, anchors, `**`), which a
hand-written fnmatch loop would get subtly wrong.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pathspec

from messaging.errors import BerthError

ALWAYS_IGNORED = [".git/", ".berth-app", "__pycache__/", "*.pyc", ".venv/", "venv/"]


def _ignore_spec(root: Path) -> pathspec.PathSpec:
    lines = list(ALWAYS_IGNORED)
    gitignore = root / ".gitignore"
    if gitignore.exists():
        lines += gitignore.read_text(errors="replace").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def files_to_pack(root: Path) -> list[Path]:
    """Relative paths of everything to ship, refusing links that leave the app."""
    spec = _ignore_spec(root)
    out: list[Path] = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        keep = []
        for d in dirnames:
            rel = rel_dir / d
            if spec.match_file(f"{rel.as_posix()}/"):
                continue
            if (root / rel).is_symlink():
                filenames.append(d)        # pack the link itself, never follow it
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = rel_dir / f
            if spec.match_file(rel.as_posix()):
                continue
            full = root / rel
            if full.is_symlink():
                target = (full.parent / os.readlink(full)).resolve()
                if not target.is_relative_to(real_root):
                    raise BerthError(f"{rel} is a link to {os.readlink(full)}, outside the app",
                                     "replace it with the file itself, or add it to .gitignore")
            out.append(rel)
    return sorted(out)


def pack(root: Path) -> tuple[Path, int]:
    """Write a .tar.gz of the app to a temp file; returns (path, file count)."""
    if not root.is_dir():
        raise BerthError(f"{root} is not a directory", "give the app's directory: `berth push DIR`")
    for needed, hint in (("requirements.txt", "list your dependencies (and gunicorn) in it"),
                         ("Procfile", "add a line like `web: gunicorn app:app`")):
        if not (root / needed).is_file():
            raise BerthError(f"{root / needed} is missing", f"create it: {hint}")
    files = files_to_pack(root)
    fd, name = tempfile.mkstemp(suffix=".tar.gz", prefix="berth-push-")
    os.close(fd)
    with tarfile.open(name, "w:gz", compresslevel=6) as tar:
        for rel in files:
            tar.add(root / rel, arcname=rel.as_posix(), recursive=False)
    return Path(name), len(files)
