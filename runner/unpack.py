"""Unpack a slug (a gzip tar) into an empty directory without ever writing outside it.

tarfile.extractall trusts the filesystem it builds: a chain of symlinks that each look
inside the app when read as text can resolve outside once the others exist, and a
later member written "through" them lands on the host. So this module never follows a
link while writing:

- every path is walked from an fd of `dest`, one component at a time, with
  O_NOFOLLOW, and files are created O_EXCL relative to their parent's fd;
- symlinks are created last, after every file, directory and hard link, so nothing is
  ever written through one; then, with all of them in place, each must resolve
  (os.path.realpath) to `dest` or inside it;
- hard links only point at files this unpack wrote itself;
- bytes are counted as they are written (not as declared), members as they are read,
  and the decompressed stream and each pax/long-name header are bounded, so a small
  gzip cannot fill the disk or the memory.

Modes follow git, which only knows 0o644 and 0o755: files are 0o755 when any exec bit
is set and 0o644 otherwise, directories 0o755; owners in the archive are ignored.

On any failure everything under `dest` is removed and `dest` itself is left, empty,
for the caller (which created it) to remove.

Run as `python -m runner.unpack DEST --max-bytes N --max-members N` with the archive
on stdin, as the app's own user: it needs no root and prints one JSON line.
"""
from __future__ import annotations

import argparse
import errno
import gzip
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

from messaging.slugfile import member_problem
from runner.errors import SlugError

log = logging.getLogger(__name__)

CHUNK = 1 << 16
PATH_MAX = 4096                 # Linux; longer paths cannot be lstat'ed by realpath
MAX_HEADER_BYTES = 64 << 10     # one pax or GNU long-name header, read whole by tarfile
HEADER_ALLOWANCE = 16 << 10     # decompressed bytes allowed per member beyond file data
EXIT_REFUSED = 3
T = TypeVar("T")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                 tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
UNSAFE_HINT = "push again; links and paths must stay inside the app"
FAILED_HINT = "push the app again to make a fresh slug"


@dataclass
class UnpackStats:
    """What one unpack wrote: members read, regular files and their bytes, links made."""

    members: int = 0
    files: int = 0
    bytes: int = 0
    links: int = 0


def unpack(fileobj: BinaryIO, dest: Path, *, max_bytes: int, max_members: int) -> UnpackStats:
    """Unpack the gzip tar read from `fileobj` (a stream: stdin works) into `dest`, an
    existing empty directory. Raises SlugError (slug_unsafe, slug_too_large or
    slug_failed) after removing everything it wrote."""
    try:
        root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SlugError(f"cannot unpack into {dest}: {exc.strerror}",
                        "the runner must create an empty directory first") from exc
    try:
        if os.listdir(root):
            raise SlugError(f"cannot unpack into {dest}: it is not empty",
                            "the runner must unpack into a fresh empty directory")
        job = _Unpack(root, os.path.realpath(dest), max_bytes, max_members)
        try:
            job.run(fileobj)
        except BaseException:
            try:
                _clear(root)
            except OSError as exc:      # the caller removes dest anyway: keep the cause
                log.warning("could not empty %s after a failed unpack: %s", dest, exc)
            raise
        return job.stats
    finally:
        os.close(root)


@dataclass
class _Link:
    name: str
    parts: tuple[str, ...]
    target: str


@dataclass
class _Unpack:
    """One unpack: the dest fd, the limits, and what has been written so far."""

    root: int
    root_real: str
    max_bytes: int
    max_members: int
    stats: UnpackStats = field(default_factory=UnpackStats)
    written: set[tuple[str, ...]] = field(default_factory=set)   # regular files only
    symlinks: list[_Link] = field(default_factory=list)

    def run(self, fileobj: BinaryIO) -> None:
        limit = self.max_bytes + (self.max_members + 2) * HEADER_ALLOWANCE
        try:
            with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz, tarfile.open(
                    fileobj=_Bounded(gz, limit, self.max_bytes), mode="r|",
                    tarinfo=_BoundedInfo) as archive:
                for member in archive:
                    self.stats.members += 1
                    if self.stats.members > self.max_members:
                        raise SlugError(
                            f"the slug has more than {self.max_members} members",
                            f"the app has more than {self.max_members} files: add generated "
                            "or vendored files to .gitignore", code="slug_too_large")
                    self._member(archive, member)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            # Filesystem errors were turned into SlugError where they happened: what is
            # left comes from reading the stream.
            raise SlugError(f"the slug is not a valid gzip tar: {exc}", FAILED_HINT) from exc
        for link in self.symlinks:
            self._symlink(link)
        for link in self.symlinks:
            self._check_inside(link)

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        problem = member_problem(member) or _own_problem(member)
        if problem:
            raise _unsafe(member.name, problem)
        if len(os.fsencode(self.root_real)) + 1 + len(os.fsencode(member.name)) >= PATH_MAX:
            raise _unsafe(member.name, "has a path too long to check safely")
        parts = _parts(member.name)
        assert parts is not None        # _own_problem refused absolute names and `..`
        if member.isdir():
            if parts:
                os.close(self._walk(member.name, parts, create=True))
            return
        if not parts:
            raise _unsafe(member.name, "names the app directory itself")
        if member.issym():
            self.symlinks.append(_Link(member.name, parts, member.linkname))
        elif member.islnk():
            self._hardlink(member, parts)
        else:
            self._file(archive, member, parts)

    def _file(self, archive: tarfile.TarFile, member: tarfile.TarInfo,
              parts: tuple[str, ...]) -> None:
        source = archive.extractfile(member)
        assert source is not None       # a regular file always has a data reader
        parent = self._walk(member.name, parts[:-1], create=True)
        try:
            fd = _fs(member.name, os.open, parts[-1], _NEW_FILE, 0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            while chunk := source.read(CHUNK):
                self.stats.bytes += len(chunk)
                if self.stats.bytes > self.max_bytes:
                    raise _too_large(member.name, self.max_bytes)
                _fs(member.name, _write_all, fd, chunk)
            _fs(member.name, os.fchmod, fd, 0o755 if member.mode & 0o111 else 0o644)
        finally:
            os.close(fd)
        self.written.add(parts)
        self.stats.files += 1

    def _hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        target = _parts(member.linkname)
        if not target or target not in self.written:
            raise _unsafe(member.name, f"is a hard link to {member.linkname!r}, "
                                       "which is not a file unpacked before it")
        src = self._walk(member.name, target[:-1], create=False)
        try:
            dst = self._walk(member.name, parts[:-1], create=True)
            try:
                _fs(member.name, os.link, target[-1], parts[-1], src_dir_fd=src,
                    dst_dir_fd=dst, follow_symlinks=False)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self.written.add(parts)
        self.stats.links += 1

    def _symlink(self, link: _Link) -> None:
        parent = self._walk(link.name, link.parts[:-1], create=True)
        try:
            _fs(link.name, os.symlink, link.target, link.parts[-1], dir_fd=parent)
        finally:
            os.close(parent)
        self.stats.links += 1

    def _check_inside(self, link: _Link) -> None:
        """With every link in place, the kernel's view: where this one really leads."""
        real = os.path.realpath(os.path.join(self.root_real, *link.parts))
        if real != self.root_real and not real.startswith(self.root_real.rstrip("/") + "/"):
            raise _unsafe(link.name, f"is a link to {link.target!r}, which resolves "
                                     "outside the app through the other links")

    def _walk(self, name: str, parts: Sequence[str], *, create: bool) -> int:
        """An fd of dest/parts, each component opened without following a symlink and,
        when `create`, made (0o755) if missing. The caller closes it."""
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts):
                made = False
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child, made = os.open(part, _DIR, dir_fd=fd), True
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[:i + 1])
                    raise _unsafe(name, f"goes through {where!r}, which is a link or a "
                                        "file, not a directory") from exc
                os.close(fd)
                fd = child
                if made:
                    os.fchmod(fd, 0o755)            # whatever the umask
        except OSError as exc:
            os.close(fd)
            raise _write_failed(name, exc) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd


class _Bounded(io.BufferedIOBase):
    """The decompressed stream, cut off past `limit` bytes: file data is counted as it
    is written, this bounds the rest (headers, padding) so the work stays bounded."""

    def __init__(self, inner: io.BufferedIOBase, limit: int, max_bytes: int) -> None:
        super().__init__()
        self.inner, self.limit, self.max_bytes, self.total = inner, limit, max_bytes, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        room = self.limit + 1 - self.total
        data = self.inner.read(room if size is None or size < 0 else min(size, room))
        self.total += len(data)
        if self.total > self.limit:
            raise SlugError(f"the slug is more than {_size(self.limit)} once decompressed",
                            f"the app unpacks to more than {_size(self.max_bytes)}: add "
                            "large files to .gitignore", code="slug_too_large")
        return data


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory: refuse a big one
    before it does."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise SlugError(f"the slug has a {self.size}-byte pax or long-name header",
                            FAILED_HINT, code="slug_too_large")
        result: tarfile.TarInfo = super()._proc_member(archive)  # type: ignore[misc]
        return result


def _own_problem(member: tarfile.TarInfo) -> str | None:
    """What this module refuses on top of member_problem, so the filesystem rules above
    never rest on the lexical ones alone."""
    if "\0" in member.name or "\0" in member.linkname:
        return "has a NUL byte in its name or link"
    if _parts(member.name) is None:
        return "is not a relative path inside the app"
    if member.issym() and (not member.linkname or member.linkname.startswith("/")):
        return f"is a link to {member.linkname!r}: links must be relative"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "is not a file, directory or link (a device or fifo)"
    return None


def _parts(name: str) -> tuple[str, ...] | None:
    """The path's components without `.` or empty ones; None if absolute or with `..`."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return None
    return tuple(part for part in path.parts if part != ".")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fs(name: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one filesystem call for member `name`, turning its OSError into a SlugError:
    an existing name is a refused duplicate, anything else a failed write."""
    try:
        return call(*args, **kwargs)
    except FileExistsError as exc:
        raise _unsafe(name, "is already in the slug (a duplicate name or a link over "
                            "an existing path)") from exc
    except OSError as exc:
        raise _write_failed(name, exc) from exc


def _clear(root: int) -> None:
    """Remove everything under the dest fd without following links (rmtree with
    dir_fd does not follow them)."""
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.name, dir_fd=root)
        else:
            os.unlink(entry.name, dir_fd=root)


def _unsafe(name: str, problem: str) -> SlugError:
    return SlugError(f"slug member {name!r} {problem}", UNSAFE_HINT, code="slug_unsafe")


def _too_large(name: str, max_bytes: int) -> SlugError:
    return SlugError(f"slug member {name!r} takes the app past {_size(max_bytes)} unpacked",
                     f"the app unpacks to more than {_size(max_bytes)}: add large files to "
                     ".gitignore", code="slug_too_large")


def _write_failed(name: str, exc: OSError) -> SlugError:
    return SlugError(f"slug member {name!r} could not be written: {exc.strerror or exc}",
                     "check free disk space on the runner, then push again")


def _size(n: int) -> str:
    if n < 1 << 20:
        return f"{n} bytes"
    return f"{n / (1 << 20):.1f}".removesuffix(".0") + " MB"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: archive on stdin, one JSON line on stdout, exit 0 or EXIT_REFUSED."""
    parser = argparse.ArgumentParser(prog="python -m runner.unpack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="an existing empty directory")
    parser.add_argument("--max-bytes", type=int, required=True,
                        help="most bytes the files may take once unpacked")
    parser.add_argument("--max-members", type=int, required=True,
                        help="most members (files, dirs, links) the archive may hold")
    args = parser.parse_args(argv)
    try:
        stats = unpack(sys.stdin.buffer, args.dest, max_bytes=args.max_bytes,
                       max_members=args.max_members)
    except SlugError as exc:
        print(json.dumps({"ok": False, **exc.to_dict()}), flush=True)
        return EXIT_REFUSED
    print(json.dumps({"ok": True, **asdict(stats)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
