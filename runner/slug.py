"""Slugs: fetch from the controller, verify the sha256, unpack safely and atomically.

Layout:
    <data_dir>/slugs/<sha>.tar.gz          verified archives (.part while downloading)
    <apps_dir>/<app>/releases/<sha>/       unpacked release trees, never modified
                                           after rename (see runner/isolation.py)
A killed runner leaves at most a .part file or a `releases/.unpack-*` temp dir, both
cleaned up and redone on the next use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from runner.errors import SlugError
from runner.venv import Wrap, unwrapped

log = logging.getLogger(__name__)

CHUNK = 1 << 16
FETCH_TIMEOUT = 60.0
UNPACK_TIMEOUT = 600.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack(archive_path: Path, dest: Path, *, max_bytes: int, max_members: int,
           wrap: Wrap = unwrapped, owner: tuple[int, int] | None = None) -> Path:
    """Unpack a gzip tar into `dest`, atomically: a temp dir beside it, then rename.

    The unpacking itself is `python -m runner.unpack`, run through `wrap` as the app's
    own user (so even a flaw in it could only write what that user may), reading the
    archive from stdin: the app's user never needs to read the runner's slug store.
    Returns `dest`; an existing `dest` is reused as is (it was complete when renamed).
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        if owner is not None:
            os.chown(tmp, *owner, follow_symlinks=False)
        command = [sys.executable, "-m", "runner.unpack", str(tmp),
                   "--max-bytes", str(max_bytes), "--max-members", str(max_members)]
        with open(archive_path, "rb") as stdin:
            proc = subprocess.run(wrap(command, (tmp,)), stdin=stdin, capture_output=True,
                                  text=True, timeout=UNPACK_TIMEOUT,
                                  env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        outcome = _outcome(proc.stdout)
        if proc.returncode != 0 or not outcome.get("ok"):
            raise SlugError(str(outcome.get("message") or
                                f"unpacking failed (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[-500:]}"),
                            str(outcome.get("hint") or "push the app again"),
                            code=str(outcome.get("code") or "slug_failed"))
        os.rename(tmp, dest)
    except subprocess.TimeoutExpired as exc:
        raise SlugError(f"unpacking slug {archive_path.name} took over "
                        f"{UNPACK_TIMEOUT:.0f}s", "push a smaller app") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _outcome(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def fetch(url: str, sha: str, token: str, dest_dir: Path) -> Path:
    """Download a slug to dest_dir/<sha>.tar.gz, verifying its sha256 on the way.

    An archive already in place was verified before it was renamed, so it is reused.
    """
    final = dest_dir / f"{sha}.tar.gz"
    if final.is_file():
        return final
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / f"{sha}.tar.gz.part"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as resp, \
                open(part, "wb") as out:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        hint = ("check that runner_token matches the controller's"
                if exc.code in (401, 403) else "check that the controller has this slug")
        raise SlugError(f"fetching slug {sha[:12]} from {url} failed: HTTP {exc.code}",
                        hint) from exc
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise SlugError(f"fetching slug {sha[:12]} from {url} failed: {reason}",
                        "check controller_url and that the controller is up") from exc
    got = digest.hexdigest()
    if got != sha:
        part.unlink(missing_ok=True)
        raise SlugError(f"slug from {url} has sha256 {got[:12]}, expected {sha[:12]}",
                        "the download was corrupted or the slug was replaced; push again")
    os.rename(part, final)
    return final


class SlugStore:
    """Fetch + unpack with one lock per (app, slug), so concurrent jobs share the work."""

    def __init__(self, data_dir: Path, token: str, max_bytes: int, max_members: int) -> None:
        self.slugs_dir = data_dir / "slugs"
        self.token = token
        self.max_bytes = max_bytes
        self.max_members = max_members
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._busy: dict[str, int] = {}     # sha -> fetches/unpacks under way

    def ensure(self, app: str, sha: str, url: str, releases: Path, wrap: Wrap = unwrapped,
               owner: tuple[int, int] | None = None) -> tuple[Path, bool]:
        """The unpacked release tree of `sha` in the app's `releases` dir; True when it
        was already there."""
        _check_name("app", app)
        _check_name("slug", sha)
        dest = releases / sha
        with self._lock(f"{app}/{sha}"):
            if dest.is_dir():
                return dest, True
            with self._guard:
                self._busy[sha] = self._busy.get(sha, 0) + 1
            try:           # prune (another prepare's) leaves the archive until unpacked
                archive = fetch(url, sha, self.token, self.slugs_dir)
                return unpack(archive, dest, max_bytes=self.max_bytes,
                              max_members=self.max_members, wrap=wrap, owner=owner), False
            finally:
                with self._guard:
                    self._busy[sha] -= 1
                    if not self._busy[sha]:
                        del self._busy[sha]

    def prune(self, keep_shas: set[str]) -> list[str]:
        """Remove archives no kept release uses any more, and none being fetched or
        unpacked (its release dir does not exist yet)."""
        gone = []
        with self._guard:
            keep_shas = keep_shas | set(self._busy)
        for archive in self.slugs_dir.glob("*.tar.gz"):
            if archive.name.removesuffix(".tar.gz") not in keep_shas:
                archive.unlink(missing_ok=True)
                gone.append(archive.name)
        return gone

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def _check_name(what: str, value: str) -> None:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise SlugError(f"{what} name {value!r} is not a plain name",
                        f"the controller must send a plain {what} name")
