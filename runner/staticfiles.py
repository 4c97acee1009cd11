"""The static file server's rules, without sockets: which file a request names and how
it is opened without ever leaving the app's static root, and what the answer's head
says (status, ETag, Last-Modified, conditional GET, Range, content type, caching).

An app's user wrote every file under a static root (collectstatic runs as that user),
so nothing in there is trusted: a path is split into segments, each percent-decoded
on its own and refused if empty, `.` or `..`, or holding `/`, `\\` or NUL; then it is
walked from the root's directory fd one `openat` at a time with O_NOFOLLOW (a
symlink anywhere is a 404, never followed), O_NONBLOCK (a planted FIFO cannot hang
the open) and O_CLOEXEC, every component checked with fstat to be a directory or a
regular file owned by the root's owner. Directories are never listed.
"""
from __future__ import annotations

import mimetypes
import os
import re
import stat
import time
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import unquote

SERVER = "berth-static"
HEADER = "x-berth-static"       # from the balancer: "<app> <prefix> <version>[,<version>..]"
# Django's ManifestStaticFilesStorage (and most bundlers): name.<12 hex>.ext
HASHED = re.compile(r"\.[0-9a-f]{12}\.[A-Za-z0-9]+$")
IMMUTABLE = "public, max-age=31536000, immutable"
SHORT = "public, max-age=60"
MAX_SEGMENTS = 32
MAX_NAME = 255

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | \
    getattr(os, "O_NOCTTY", 0)

# what browsers need to be exact about (the system's mime.types may lack or differ)
TYPES = {
    ".css": "text/css", ".js": "text/javascript", ".mjs": "text/javascript",
    ".json": "application/json", ".map": "application/json", ".html": "text/html",
    ".htm": "text/html", ".txt": "text/plain", ".xml": "application/xml",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".avif": "image/avif", ".ico": "image/vnd.microsoft.icon", ".woff": "font/woff",
    ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".eot": "application/vnd.ms-fontobject", ".wasm": "application/wasm",
    ".pdf": "application/pdf", ".mp4": "video/mp4", ".webm": "video/webm",
    ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".gz": "application/gzip",
    ".zip": "application/zip", ".webmanifest": "application/manifest+json",
}
_TEXTUAL = ("text/", "application/json", "application/xml", "image/svg+xml",
            "application/manifest+json")


class NotFound(Exception):
    """The request names no file we may serve (every refusal looks the same)."""


def cache_control(name: str) -> str:
    """Immutable for a content-hashed name (a new file gets a new name), short else."""
    return IMMUTABLE if HASHED.search(name) else SHORT


def content_type(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    kind = TYPES.get(ext) or mimetypes.types_map.get(ext) or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith(_TEXTUAL) else kind


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# -- which file -------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What the balancer's X-Berth-Static header names: the app, the URL prefix its
    static files live under and the release versions to look in, in order."""
    app: str
    prefix: str
    versions: tuple[int, ...]


def parse_header(value: str | None) -> Target | None:
    parts = (value or "").split()
    if len(parts) != 3 or not parts[1].startswith("/") or not parts[1].endswith("/"):
        return None
    try:
        versions = tuple(int(v) for v in parts[2].split(","))
    except ValueError:
        return None
    if not versions or any(v <= 0 for v in versions):
        return None
    return Target(parts[0], parts[1], versions)


def segments(target: str, prefix: str) -> list[str]:
    """The path segments below `prefix` of a request target, each decoded; NotFound
    for anything that is not a plain relative file path."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith(prefix):
        raise NotFound()
    raw = path[len(prefix):].split("/")
    if len(raw) > MAX_SEGMENTS:
        raise NotFound()
    out = []
    for part in raw:
        try:
            name = unquote(part, errors="strict")
        except UnicodeDecodeError:
            raise NotFound() from None
        if name in ("", ".", "..") or len(name) > MAX_NAME \
                or any(c in name for c in "/\\\x00"):
            raise NotFound()
        out.append(name)
    return out


def open_dirs(base_fd: int, names: list[str], uid: int | None = None) -> int:
    """The directory `names` below the directory fd `base_fd`, walked one O_NOFOLLOW
    openat at a time; every component a directory (owned by `uid` when given). The
    caller closes the returned fd. NotFound for anything else."""
    fd = os.dup(base_fd)
    try:
        for name in names:
            if name in ("", ".", "..") or "/" in name or "\x00" in name:
                raise NotFound()
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                raise NotFound() from None
            os.close(fd)
            fd = nxt
            info = os.fstat(fd)
            if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
                raise NotFound()
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(root_fd: int, names: list[str], uid: int | None
              ) -> tuple[int, os.stat_result]:
    """A regular file below the static root `root_fd` (every component owned by `uid`
    when given): (fd, its stat). The caller closes the fd."""
    if not names:
        raise NotFound()
    parent = open_dirs(root_fd, names[:-1], uid) if len(names) > 1 else os.dup(root_fd)
    try:
        try:
            fd = os.open(names[-1], _FILE_FLAGS, dir_fd=parent)
        except OSError:
            raise NotFound() from None
    finally:
        os.close(parent)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (uid is not None and info.st_uid != uid):
            raise NotFound()
        return fd, info
    except BaseException:
        os.close(fd)
        raise


# -- what to answer ---------------------------------------------------------------------

@dataclass
class Answer:
    """The decision for one found file: status, the byte range of the body to send
    (none for HEAD and 304) and the head's fields."""
    status: int
    offset: int = 0
    length: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)


REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 416: "Range Not Satisfiable",
           500: "Internal Server Error"}


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match (weak comparison): `*` or any listed tag with the same opaque
    value."""
    value = header.strip()
    if value == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in value.split(","))


def parse_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """One `bytes=` range as (offset, length); None when the header is to be ignored
    (malformed, another unit, several ranges: the whole file is sent); False when it
    cannot be satisfied (416)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0:
            return False
        n = min(n, size)
        return (size - n, n) if size else False
    start = int(first)
    if start >= size:
        return False
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None
    return start, end - start + 1


def decide(method: str, headers: dict[str, str], name: str, size: int, mtime: float,
           etag: str) -> Answer:
    """The answer for a found file of `size` bytes (RFC 9110 section 13.2.2 order:
    If-None-Match, else If-Modified-Since; then Range, honoured for GET only and
    with If-Range only when it still names this file)."""
    modified = int(mtime)
    common = [("ETag", etag), ("Last-Modified", http_date(modified)),
              ("Cache-Control", cache_control(name))]
    inm = headers.get("if-none-match")
    if inm is not None:
        if etag_matches(inm, etag):
            return Answer(304, headers=common)
    else:
        ims = headers.get("if-modified-since")
        since = parse_http_date(ims) if ims else None
        if since is not None and modified <= since:
            return Answer(304, headers=common)
    full = [("Content-Type", content_type(name)), *common, ("Accept-Ranges", "bytes"),
            ("X-Content-Type-Options", "nosniff")]
    wanted = headers.get("range")
    if wanted is not None and method == "GET" and _if_range_holds(headers, etag, modified):
        picked = parse_range(wanted, size)
        if picked is False:
            return Answer(416, headers=[*full, ("Content-Range", f"bytes */{size}"),
                                        ("Content-Length", "0")])
        if isinstance(picked, tuple):
            offset, length = picked
            return Answer(206, offset, length, [
                *full, ("Content-Range", f"bytes {offset}-{offset + length - 1}/{size}"),
                ("Content-Length", str(length))])
    return Answer(200, 0, size if method == "GET" else 0,
                  [*full, ("Content-Length", str(size))])


def _if_range_holds(headers: dict[str, str], etag: str, modified: int) -> bool:
    value = headers.get("if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag and not etag.startswith("W/")      # strong comparison
    when = parse_http_date(value)
    return when is not None and modified <= when


def head(status: int, headers: list[tuple[str, str]], *, keep_alive: bool = True,
         now: float | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Server: {SERVER}",
             f"Date: {http_date(time.time() if now is None else now)}",
             *(f"{k}: {v}" for k, v in headers)]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error(status: int, message: str, *, keep_alive: bool = True,
          head_only: bool = False, now: float | None = None) -> bytes:
    body = (message + "\n").encode()
    extra = [("Allow", "GET, HEAD")] if status == 405 else []
    out = head(status, [("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                        *extra], keep_alive=keep_alive, now=now)
    return out if head_only else out + body
