"""The offsite pull, rsync flavour: the offsite host pulls new snapshots from a served
host's read-only rsync module (rsync daemon `read only = yes`, or ssh with a forced
`rrsync -ro`: the same URL shape either way); nothing on the served host holds a
credential for the offsite host, so nothing there can list, change or delete its
copies.

A copy is pulled into `<name>.partial` with `--link-dest=<previous complete copy of
the volume>` (unchanged files become hard links: only changes travel and take space),
then the served side's manifest (`<name>.manifest.json`, written there last), then
both are renamed into place and the copy is verified against that manifest: it is
complete only then (manifest.is_complete). rsync's quick check can take a file
rewritten at the same size and mtime tick as unchanged; the manifest catches that and
one `--checksum` pass fixes it. A pull that fails or is interrupted leaves
at most a `.partial`, removed at the next pull; a complete copy is never replaced.

Verifying a copy reads only what it does not share with the previous complete copy
(manifest.verify's `trusted`: hard links here, cloned extents in the btrfs flavour):
bytes already verified are not hashed again at every pull. `rehash=True` reads
everything (do it now and then, or run btrfs scrub, for rot in what copies share).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dbprovision import command
from dbprovision.errors import CommandFailed
from dbprovision.ports import free_port, listening

from . import btrfs, manifest
from .errors import BackupError, ManifestMismatch, ManifestMissing
from .snapshots import NAME, parse_name

log = logging.getLogger(__name__)

RECEIVED = re.compile(r"Total bytes received: ([\d,]+)")


@dataclass(frozen=True)
class Pulled:
    name: str
    copy: Path
    previous: Path | None
    bytes_received: int
    seconds: float


def _rsync(args: list[str | Path], *, password_file: Path | None, timeout: float,
           address: str | None = None) -> str:
    """`address`: the offsite host's own address, the one the served host's module
    allows (rsync --address binds the outgoing socket to it)."""
    extra: list[str | Path] = [f"--password-file={password_file}"] if password_file else []
    if address:
        extra.append(f"--address={address}")
    return command.run(["rsync", *extra, *args], timeout=timeout,
                       hint="is the served host's read-only module reachable?").stdout


def list_remote(source: str, *, password_file: Path | None = None,
                timeout: float = 60, address: str | None = None) -> list[str]:
    """Snapshot names in the served host's module (`rsync://host:port/module`)."""
    out = _rsync(["--list-only", f"{source}/"], password_file=password_file, timeout=timeout,
                 address=address)
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if NAME.match(n))


def complete_copies(copies: Path, volume: str | None = None) -> list[Path]:
    found = []
    for entry in copies.iterdir():
        if NAME.match(entry.name) and manifest.is_complete(entry) and \
                (volume is None or parse_name(entry.name)[0] == volume):
            found.append(entry)
    return sorted(found, key=lambda p: parse_name(p.name)[1])


def pull(source: str, name: str, copies: Path, *, password_file: Path | None = None,
         timeout: float = 3600, address: str | None = None, rehash: bool = False) -> Pulled:
    """Pull snapshot `name` into `copies/name`, link-dest against the newest complete
    copy of its volume, and verify it against the served side's manifest."""
    volume, _ = parse_name(name)
    final = copies / name
    if final.exists() and manifest.is_complete(final):
        raise BackupError(f"copy {name} is already complete here",
                          "a complete copy is never replaced", status=409)
    previous = next(iter(reversed(complete_copies(copies, volume))), None)
    partial = copies / f"{name}.partial"
    partial_manifest = copies / f"{name}.manifest.json.partial"
    for leftover in (partial, final):       # an earlier interrupted or unverified pull
        if leftover.exists():
            leftover.chmod(0o755)
            shutil.rmtree(leftover)
    started = time.monotonic()
    args: list[str | Path] = ["-a", "-H", "--numeric-ids", "--delete", "--stats"]
    if previous is not None:
        args.append(f"--link-dest={previous.resolve()}")
    out = _rsync([*args, f"{source}/{name}/", f"{partial}/"], password_file=password_file,
                 timeout=timeout, address=address)
    received = int(m.group(1).replace(",", "")) if (m := RECEIVED.search(out)) else 0
    try:
        _rsync(["--no-motd", f"{source}/{name}.manifest.json", partial_manifest],
               password_file=password_file, timeout=timeout, address=address)
    except CommandFailed as exc:
        raise ManifestMissing(f"the served host has no manifest for {name}",
                              "write it there after the snapshot (backup.manifest.write), "
                              "then pull again") from exc
    os.rename(partial, final)
    os.rename(partial_manifest, manifest.manifest_path(final))
    manifest.stamp_path(final).unlink(missing_ok=True)
    try:
        manifest.verify(final, trusted=None if rehash else previous)
    except ManifestMismatch as exc:
        # rsync's quick check (size + mtime) links a file rewritten at the same size
        # within one timestamp tick; the manifest caught it. One more pass comparing
        # contents moves just those files (new inodes: older copies keep theirs);
        # a second mismatch is real and the copy stays incomplete.
        log.warning("copy differs from its manifest, pulling by checksum",
                    extra={"copy": str(final), "why": exc.message})
        out = _rsync(["-a", "-H", "--numeric-ids", "--delete", "--stats", "--checksum",
                      f"{source}/{name}/", f"{final}/"], password_file=password_file,
                     timeout=timeout, address=address)
        received += int(m.group(1).replace(",", "")) if (m := RECEIVED.search(out)) else 0
        manifest.verify(final, trusted=None if rehash else previous)
    seconds = time.monotonic() - started
    log.info("copy pulled", extra={"copy": str(final), "previous": str(previous or ""),
                                   "bytes": received, "seconds": round(seconds, 3)})
    return Pulled(name, final, previous, received, seconds)


def pull_new(source: str, copies: Path, *, password_file: Path | None = None,
             timeout: float = 3600, address: str | None = None,
             rehash: bool = False) -> list[Pulled]:
    """Every snapshot the served host has and this side holds no complete copy of,
    oldest first (so each links against the one before)."""
    have = {p.name for p in complete_copies(copies)}
    todo = [n for n in list_remote(source, password_file=password_file, timeout=timeout,
                                   address=address)
            if n not in have]
    todo.sort(key=lambda n: parse_name(n)[1])
    return [pull(source, n, copies, password_file=password_file, timeout=timeout,
                 address=address, rehash=rehash) for n in todo]


# -- btrfs flavour: the served host's forced command (backup/forced.py) --------------

Remote = Callable[[list[str]], list[str]]
"""The argv that asks the served host's forced command `request`, e.g.
`lambda req: ["ssh", "-i", key, "-o", "BatchMode=yes", "backup@served", *req]`."""


def pull_btrfs(remote: Remote, copies: Path, *, timeout: float = 3600,
               rehash: bool = False) -> list[Pulled]:
    """Every read-only snapshot the served host lists that `copies` (on btrfs) holds
    no complete copy of, oldest first, each incremental against the newest complete
    copy of its volume, received, given the served side's manifest, verified."""
    listed = command.run(remote(["list"]), timeout=60).stdout.split()
    have = {p.name for p in complete_copies(copies)}
    todo = sorted((n for n in listed if NAME.match(n) and n not in have),
                  key=lambda n: parse_name(n)[1])
    out = []
    for name in todo:
        volume, _ = parse_name(name)
        final = copies / name
        if final.exists():                  # received earlier but never verified
            btrfs.delete_subvolume(final)
        previous = next(iter(reversed(complete_copies(copies, volume))), None)
        request = ["send", name] + ([previous.name] if previous else [])
        moved, seconds = btrfs.receive_from(remote(request), copies, name, timeout=timeout)
        body = command.run(remote(["manifest", name]), timeout=300).stdout
        target = manifest.manifest_path(final)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(body)
        os.rename(partial, target)
        manifest.stamp_path(final).unlink(missing_ok=True)
        manifest.verify(final, trusted=None if rehash else previous)
        log.info("copy pulled", extra={"copy": str(final), "previous": str(previous or ""),
                                       "bytes": moved, "seconds": round(seconds, 3)})
        out.append(Pulled(name, final, previous, moved, seconds))
    return out


# -- checking what the offsite host holds ------------------------------------------


@dataclass(frozen=True)
class Checked:
    copy: Path
    files: int
    databases: list[str] | None        # a PostgreSQL copy, started and queried
    start_seconds: float | None


def check_copy(copies: Path, volume: str, at: datetime | None = None) -> Checked:
    """Re-verify the copy of `volume` in `copies` newest at or before `at` (default:
    the newest): every file hashed again against its manifest (nothing trusted), and,
    when it holds a PostgreSQL cluster, the cluster started on a scratch copy beside
    it (as whoever runs this: the offsite user owns its copies) and its databases
    listed. The scratch copy is removed."""
    from .pgverify import verify_postgres
    from .restore import as_of
    from .snapshots import Snapshot
    found = [Snapshot(parse_name(p.name)[1], volume, p) for p in copies.iterdir()
             if NAME.match(p.name) and parse_name(p.name)[0] == volume
             and manifest.manifest_path(p).exists()]
    chosen = as_of(found, at or datetime.now(UTC)).path
    files = manifest.verify(chosen)
    if not (chosen / "data" / "PG_VERSION").exists():
        return Checked(chosen, files, None, None)
    # beside the copies (a btrfs clone when they are on btrfs), in a dir the cluster's
    # user can pass: postgres when root runs this, else the offsite user itself
    work = Path(tempfile.mkdtemp(prefix=".berth-check-", dir=copies.parent))
    work.chmod(0o711)
    scratch = work / secrets.token_hex(4)
    try:
        got = verify_postgres(chosen, scratch, free_port("127.0.0.1"),
                              "SELECT datname FROM pg_database WHERE NOT datistemplate "
                              "ORDER BY 1")
    finally:
        if scratch.exists() and btrfs.is_subvolume(scratch):
            btrfs.delete_subvolume(scratch)
        shutil.rmtree(work, ignore_errors=True)
    return Checked(chosen, files, [str(r[0]) for r in got.rows], got.start_seconds)


@contextlib.contextmanager
def read_only_module(path: Path, work: Path, allow: str = "127.0.0.1",
                     timeout: float = 10.0) -> Iterator[str]:
    """The served host's side: `path` as a read-only, listable rsync daemon module
    (`[snapshots]`) on a free loopback port, reachable from `allow` alone; yields its
    URL and stops the daemon by its PID. Its config goes in `work`."""
    port = free_port("127.0.0.1")
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\n[snapshots]\n  path = {path}\n  read only = yes\n"
                    "  list = yes\n  uid = root\n  gid = root\n"
                    f"  hosts allow = {allow}\n  hosts deny = *\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                               "--address=127.0.0.1", f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not listening("127.0.0.1", port):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise BackupError(f"rsync --daemon for {path} did not start",
                                  f"check {conf} and that rsync is installed "
                                  "(scripts/setup.sh installs it)")
            time.sleep(0.02)
        yield f"rsync://127.0.0.1:{port}/snapshots"
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=5)
