"""The host's static file server: `python -m runner.static --listen-fd N --control-fd M
[--user UID --group GID]`, started and supervised by the runner (runner/staticsup.py).

It serves the collected static files of the releases running on this host, to the
balancer only: each request carries `X-Berth-Static: <app> <prefix> <versions>`
(balancer/admission.py sets it and removes any a client sent), which names the app,
the URL prefix to strip and the release versions to look in, in order. It opens
nothing by path from the top: the runner (root) opens each release's static root
with an O_NOFOLLOW walk and hands over the directory fd on the control socket (a
SOCK_SEQPACKET pair, with SCM_RIGHTS), so this process drops to `--user` (nobody)
before it reads a request and can reach only what it was handed, then walks below
each root one openat at a time (runner/staticfiles.py). The listening socket is the
runner's, inherited, so a restart keeps the port; requests are served only once the
runner has sent every root and `serve`.

Control messages (JSON, one per packet): {"op": "add", "app", "version"} with one fd,
{"op": "drop", "app", "version"}, {"op": "serve"}. End of file on the control socket
(the runner is gone) ends this process.

Files up to SMALL bytes are kept in memory after their first read (with their ETag,
a content hash, so every host gives the same one), keyed by inode, size and times;
larger ones go out with sendfile and their hash is computed once in a thread.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

from runner import staticfiles as sf

log = logging.getLogger("berth.static")

SMALL = 256 << 10               # files kept in memory up to this size
CACHE_BYTES = 64 << 20          # most bytes of file bodies kept
CACHE_ENTRIES = 8192
HEAD_LIMIT = 16 << 10           # largest request head
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 75.0             # a kept-alive connection waiting for its next request
CHUNK = 1 << 20


@dataclass
class Root:
    fd: int
    uid: int


@dataclass
class Entry:
    etag: str
    body: bytes | None


class Server:
    def __init__(self, listen: socket.socket, control: socket.socket) -> None:
        self.listen = listen
        self.control = control
        self.roots: dict[tuple[str, int], Root] = {}
        self.cache: collections.OrderedDict[tuple[int, ...], Entry] = collections.OrderedDict()
        self.cached_bytes = 0
        self.server: asyncio.Server | None = None
        self.done = asyncio.Event()

    # -- control ------------------------------------------------------------------

    def on_control(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, 65536, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                log.info("the runner closed the control socket; stopping")
                asyncio.get_running_loop().remove_reader(self.control.fileno())
                self.done.set()
                return
            try:
                self.apply(json.loads(data), fds)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("bad control message: %s", exc)
                for fd in fds:
                    os.close(fd)

    def apply(self, msg: dict[str, object], fds: list[int]) -> None:
        op = msg["op"]
        if op == "add" and len(fds) == 1:
            key = (str(msg["app"]), int(str(msg["version"])))
            old = self.roots.pop(key, None)
            if old is not None:
                os.close(old.fd)
            self.roots[key] = Root(fds[0], os.fstat(fds[0]).st_uid)
            return
        for fd in fds:
            os.close(fd)
        if op == "drop":
            old = self.roots.pop((str(msg["app"]), int(str(msg["version"]))), None)
            if old is not None:
                os.close(old.fd)
        elif op == "serve" and self.server is not None and not self.server.is_serving():
            asyncio.get_running_loop().create_task(self.server.start_serving())

    # -- requests -----------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            timeout = HEAD_TIMEOUT
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except asyncio.LimitOverrunError:
                    writer.write(sf.error(400, "request head too large", keep_alive=False))
                    break
                except (asyncio.IncompleteReadError, TimeoutError):
                    break
                if not await self.answer(raw, writer):
                    break
                timeout = IDLE_TIMEOUT
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("request failed")
        finally:
            writer.close()

    async def answer(self, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request head; whether the connection stays open."""
        try:
            method, target, keep, headers = parse_head(raw)
        except ValueError as exc:
            writer.write(sf.error(400, str(exc), keep_alive=False))
            return False
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            writer.write(sf.error(405, "only GET and HEAD", keep_alive=False))
            return False
        if headers.get("content-length", "0").strip() != "0" \
                or "transfer-encoding" in headers:
            writer.write(sf.error(400, "a GET carries no body here", keep_alive=False))
            return False
        spec = sf.parse_header(headers.get(sf.HEADER))
        if spec is None:
            writer.write(sf.error(400, "no static target", keep_alive=keep,
                                  head_only=head_only))
            return keep
        found = self.find(spec, target)
        if found is None:
            writer.write(sf.error(404, "not found", keep_alive=keep, head_only=head_only))
            return keep
        fd, info, name = found
        try:
            entry = await self.entry(fd, info)
            ans = sf.decide(method, headers, name, info.st_size, info.st_mtime, entry.etag)
            writer.write(sf.head(ans.status, ans.headers, keep_alive=keep))
            if ans.length:
                if entry.body is not None:
                    writer.write(entry.body[ans.offset:ans.offset + ans.length])
                else:
                    await writer.drain()
                    with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
                        await asyncio.get_running_loop().sendfile(
                            writer.transport, fh, ans.offset, ans.length)
            if writer.transport.get_write_buffer_size() > CHUNK:
                await writer.drain()
        finally:
            os.close(fd)
        return keep

    def find(self, spec: sf.Target, target: str) -> tuple[int, os.stat_result, str] | None:
        try:
            names = sf.segments(target, spec.prefix)
        except sf.NotFound:
            return None
        for version in spec.versions:
            root = self.roots.get((spec.app, version))
            if root is None:
                continue
            try:
                fd, info = sf.open_file(root.fd, names, root.uid)
            except sf.NotFound:
                continue
            return fd, info, names[-1]
        return None

    async def entry(self, fd: int, info: os.stat_result) -> Entry:
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        entry = self.cache.get(key)
        if entry is not None:
            self.cache.move_to_end(key)
            return entry
        if info.st_size <= SMALL:
            body = read_all(fd, info.st_size)
            entry = Entry(etag_of(hashlib.blake2b(body, digest_size=16).hexdigest()), body)
        else:
            digest = await asyncio.get_running_loop().run_in_executor(
                None, hash_file, fd, info.st_size)
            entry = Entry(etag_of(digest), None)
        self.cache[key] = entry
        self.cached_bytes += len(entry.body or b"")
        while len(self.cache) > CACHE_ENTRIES or self.cached_bytes > CACHE_BYTES:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= len(old.body or b"")
        return entry


def etag_of(digest: str) -> str:
    return f'"{digest}"'


def read_all(fd: int, size: int) -> bytes:
    parts, offset = [], 0
    while offset < size:
        data = os.pread(fd, min(CHUNK, size - offset), offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
    return b"".join(parts)


def hash_file(fd: int, size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    offset = 0
    while offset < size:
        data = os.pread(fd, CHUNK, offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
    return digest.hexdigest()


def parse_head(raw: bytes) -> tuple[str, str, bool, dict[str, str]]:
    """(method, target, keep-alive, headers with lowercase names; repeated ones joined
    with commas). ValueError when it is not an HTTP/1.x request head."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1]:
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError("bad header line")
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "keep-alive" in tokens if parts[2] == "HTTP/1.0" else "close" not in tokens
    return parts[0], parts[1], keep, headers


def drop_privileges(uid: int | None, gid: int | None) -> None:
    if uid is None or os.getuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid if gid is not None else uid, gid if gid is not None else uid,
                 gid if gid is not None else uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("runner.static: could not drop root")


async def serve(listen: socket.socket, control: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = Server(listen, control)
    server.server = await asyncio.start_server(server.handle, sock=listen, limit=HEAD_LIMIT,
                                               start_serving=False)
    control.setblocking(False)
    loop.add_reader(control.fileno(), server.on_control)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.done.set)
    server.on_control()
    await server.done.wait()
    server.server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.static")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--user", type=int)
    parser.add_argument("--group", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s static %(levelname)s %(message)s")
    listen = socket.socket(fileno=args.listen_fd)
    control = socket.socket(fileno=args.control_fd)
    drop_privileges(args.user, args.group)
    asyncio.run(serve(listen, control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
