"""Checking a pushed tarball before anything is stored.

The tarball comes from a user and is hostile until proven otherwise: every member
goes through messaging.slugfile's rules (the ones the runner unpacks by: absolute
paths, `..`, links that leave the tree and special files are refused), and sizes are
bounded so a gzip bomb costs us nothing. Then the app must have what it needs to run,
and its optional manifest (berth.yaml, controller/manifest.py) must parse.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller import manifest
from controller.errors import Invalid, TooLarge
from messaging import slugfile
from messaging.manifest import Manifest

PROC_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,29}$")
RESERVED_DIR = ".berth"      # the platform's, inside a release (collected static files)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass
class CheckedSlug:
    sha256: str
    size: int
    files: int
    unpacked: int
    procfile: dict[str, str]
    manifest: Manifest = field(default_factory=Manifest)


def receive(stream: Readable, length: int, dest_dir: Path, max_bytes: int) -> tuple[Path, str]:
    """Copy an upload of `length` bytes to a temp file, hashing as it goes."""
    if length > max_bytes:
        raise TooLarge(f"the push is {length / 1e6:.1f} MB, above the limit of "
                       f"{max_bytes / 1e6:.0f} MB",
                       "add large files to .gitignore (data, media, virtualenvs) and push again")
    dest_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd = tempfile.NamedTemporaryFile(dir=dest_dir, suffix=".upload", delete=False)
    try:
        with fd:
            left = length
            while left:
                chunk = stream.read(min(left, 1 << 16))
                if not chunk:
                    raise Invalid(f"the upload ended after {length - left} of {length} "
                                  "bytes", "push again; check your network connection")
                digest.update(chunk)
                fd.write(chunk)
                left -= len(chunk)
    except BaseException:               # cut short, too slow: no partial upload left
        Path(fd.name).unlink(missing_ok=True)
        raise
    return Path(fd.name), digest.hexdigest()


def parse_procfile(text: str) -> dict[str, str]:
    procs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        name, command = name.strip(), command.strip()
        if not sep or not PROC_NAME.match(name) or not command:
            raise Invalid(f"Procfile line {number} is not `type: command`: {raw!r}",
                          "write lines like `web: gunicorn app:app`")
        procs[name] = command
    return procs


_ASSIGNMENTS = re.compile(r"""^(\s*[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|"[^"]*"|\S)*)*\s*""")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _check_gunicorn(web: str, requirements: bytes) -> None:
    """A `web: gunicorn ...` line needs gunicorn in requirements.txt: say so at push
    time, not as a crash after the build. Requirements that include other files
    (`-r`, `-c`) or point at URLs are not second-guessed."""
    program = _ASSIGNMENTS.sub("", web, count=1).split(maxsplit=1)
    if not program or program[0] != "gunicorn":
        return
    names = set()
    for line in requirements.decode("utf-8", errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-") or "://" in line:
            return
        m = _REQUIREMENT_NAME.match(line)
        if m:
            names.add(re.sub(r"[-_.]+", "-", m.group(1)).lower())
    if "gunicorn" not in names:
        raise Invalid("the Procfile runs gunicorn but requirements.txt does not list it",
                      "add a line `gunicorn` to requirements.txt and push again")


def check(path: Path, sha256: str, *, max_unpacked: int, max_files: int) -> CheckedSlug:
    """Validate a gzip tarball; raises Invalid/TooLarge naming the offending member."""
    files = unpacked = 0
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                files += 1
                if files > max_files:
                    raise TooLarge(f"the push has more than {max_files} files",
                                   "add generated files and dependencies to .gitignore")
                problem = slugfile.member_problem(member)
                if problem:
                    raise Invalid(f"unsafe path in push: {member.name!r} {problem}",
                                  "remove links that point outside the app directory and "
                                  "paths with `..`, then push again")
                name = member.name.removeprefix("./")
                if name.split("/", 1)[0] == RESERVED_DIR:
                    raise Invalid(f"the push has {member.name!r}: {RESERVED_DIR}/ at the top "
                                  "of an app is the platform's",
                                  f"rename {RESERVED_DIR}/, or add it to .gitignore")
                if member.issym() or member.islnk():
                    continue
                unpacked += member.size
                if unpacked > max_unpacked:
                    raise TooLarge(f"the push unpacks to more than {max_unpacked / 1e6:.0f} MB",
                                   "add large files to .gitignore and push again")
                if name in ("requirements.txt", "Procfile", manifest.FILE) and member.isfile():
                    fobj = tar.extractfile(member)
                    found[name] = fobj.read(1 << 20) if fobj else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise Invalid(f"the push is not a readable gzip tarball: {exc}",
                      "push with `berth push`, which packs the directory for you") from exc
    if "requirements.txt" not in found:
        raise Invalid("the app has no requirements.txt at its top level",
                      "add requirements.txt listing your dependencies, including gunicorn")
    if "Procfile" not in found:
        raise Invalid("the app has no Procfile at its top level",
                      "add a Procfile with a line like `web: gunicorn app:app`")
    procfile = parse_procfile(found["Procfile"].decode("utf-8", errors="replace"))
    if "web" not in procfile:
        raise Invalid("the Procfile declares no `web` process",
                      "add a line like `web: gunicorn app:app` to the Procfile")
    _check_gunicorn(procfile["web"], found["requirements.txt"])
    app_manifest = manifest.parse(found[manifest.FILE], procfile) \
        if manifest.FILE in found else Manifest()
    return CheckedSlug(sha256, path.stat().st_size, files, unpacked, procfile, app_manifest)
