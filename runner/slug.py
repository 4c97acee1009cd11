"""Slugs: fetch from the controller, verify the sha256, unpack safely and atomically.

Layout under the runner's data dir:
    slugs/<sha>.tar.gz            verified archives (a .part file while downloading)
    apps/<app>/<sha>/             unpacked release trees, never modified after rename
A killed runner leaves at most a .part file or an `apps/<app>/.unpack-*` temp dir,
both cleaned up and redone on the next use.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from messaging import slugfile
from runner.errors import SlugError

log = logging.getLogger(__name__)

CHUNK = 1 << 16
FETCH_TIMEOUT = 60.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_members(archive: tarfile.TarFile) -> None:
    """Reject members that would land outside the destination, before anything is
    written, with one clear error naming the member."""
    for member in archive.getmembers():
        problem = slugfile.member_problem(member)
        if problem:
            raise SlugError(f"slug member {member.name!r} {problem}",
                            "push the app again; links and paths must stay inside it")


def unpack(archive_path: Path, dest: Path) -> Path:
    """Unpack a gzip tar into `dest`, atomically: a temp dir beside it, then rename.

    Returns `dest`; an existing `dest` is reused as is (it was complete when renamed).
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive_path, "r:gz") as archive:
                check_members(archive)
                slugfile.extract(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SlugError(f"cannot unpack slug {archive_path.name}: {exc}",
                            "push the app again to make a fresh slug") from exc
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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
    """Fetch + unpack with one lock per slug, so concurrent jobs share the work."""

    def __init__(self, data_dir: Path, token: str) -> None:
        self.slugs_dir = data_dir / "slugs"
        self.apps_dir = data_dir / "apps"
        self.token = token
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def release_dir(self, app: str, sha: str) -> Path:
        return self.apps_dir / app / sha

    def ensure(self, app: str, sha: str, url: str) -> tuple[Path, bool]:
        """The unpacked release tree for (app, sha); True when it was already there."""
        _check_name("app", app)
        _check_name("slug", sha)
        dest = self.release_dir(app, sha)
        with self._lock(sha):
            if dest.is_dir():
                return dest, True
            archive = fetch(url, sha, self.token, self.slugs_dir)
            return unpack(archive, dest), False

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def _check_name(what: str, value: str) -> None:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise SlugError(f"{what} name {value!r} is not a plain name",
                        f"the controller must send a plain {what} name")
