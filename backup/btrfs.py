"""btrfs-progs, driven through dbprovision.command (argument lists, timeouts, the end
of stderr in every error): is a path on btrfs, subvolumes, read-only snapshots, and
`btrfs send [-p parent] | btrfs receive` as a pipeline of two processes (no shell).

The pipeline is the one thing the command wrapper cannot do (it runs one program to
completion); `send_receive` pumps the bytes itself so it can count them, and keeps the
wrapper's rules: own sessions, a deadline after which both process groups are killed,
failures raised as the wrapper's CommandFailed through `command.failure`.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dbprovision import command
from dbprovision.errors import ProgramMissing

from .errors import NotBtrfs, TransferFailed

log = logging.getLogger(__name__)

BTRFS = "btrfs"
BTRFS_MAGIC = 0x9123683E
CHUNK = 1 << 20


def is_btrfs(path: Path) -> bool:
    """Whether `path` lives on a btrfs filesystem (`stat -f -c %t`, the fs magic)."""
    out = command.run(["stat", "-f", "-c", "%t", path], timeout=10).stdout.strip()
    return int(out, 16) == BTRFS_MAGIC


def is_subvolume(path: Path) -> bool:
    """Whether `path` is a subvolume (btrfs gives them inode 256)."""
    return path.is_dir() and is_btrfs(path) and path.stat().st_ino == 256


def create_subvolume(path: Path) -> None:
    if not is_btrfs(path.parent):
        raise NotBtrfs(f"{path.parent} is not on btrfs; cannot make subvolume {path.name}")
    command.run([BTRFS, "subvolume", "create", path], timeout=30)
    log.info("subvolume created", extra={"path": str(path)})


def snapshot_readonly(src: Path, dest: Path) -> float:
    """An atomic, read-only snapshot of subvolume `src` at `dest`; returns seconds."""
    if not is_subvolume(src):
        raise NotBtrfs(f"{src} is not a btrfs subvolume")
    result = command.run([BTRFS, "subvolume", "snapshot", "-r", src, dest], timeout=60)
    log.info("snapshot taken", extra={"src": str(src), "dest": str(dest),
                                      "seconds": round(result.seconds, 4)})
    return result.seconds


def is_readonly(path: Path) -> bool:
    out = command.run([BTRFS, "property", "get", "-ts", path, "ro"], timeout=10).stdout
    return out.strip() == "ro=true"


def delete_subvolume(path: Path) -> None:
    command.run([BTRFS, "subvolume", "delete", path], timeout=60)
    log.info("subvolume deleted", extra={"path": str(path)})


@dataclass(frozen=True)
class Transfer:
    """What one send | receive moved: the stream's bytes and the wall time."""

    snapshot: Path
    parent: Path | None
    received: Path
    bytes: int
    seconds: float


def send_receive(snapshot: Path, dest_dir: Path, *, parent: Path | None = None,
                 timeout: float = 3600) -> Transfer:
    """`btrfs send [-p parent] snapshot | btrfs receive dest_dir`, two processes and a
    pump between them. With `parent` only the difference travels (the parent must
    already be in dest_dir, received earlier). A failure removes the partial subvolume
    so an interrupted transfer never looks like a copy."""
    send_argv = [BTRFS, "send", "-q", *(["-p", os.fspath(parent)] if parent else []),
                 os.fspath(snapshot)]
    moved, seconds = receive_from(send_argv, dest_dir, snapshot.name, timeout=timeout)
    return Transfer(snapshot, parent, dest_dir / snapshot.name, moved, seconds)


def receive_from(send_argv: list[str], dest_dir: Path, name: str, *,
                 timeout: float = 3600) -> tuple[int, float]:
    """`<send_argv> | btrfs receive dest_dir`: the producer is `btrfs send` here or,
    for an offsite pull, the transport to the served host's forced command (ssh ...).
    Returns (bytes, seconds); on failure the partial `dest_dir/name` is removed."""
    snapshot = Path(name)
    recv_argv = [BTRFS, "receive", os.fspath(dest_dir)]
    received = dest_dir / name
    started = time.monotonic()
    try:
        sender = subprocess.Popen(send_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        receiver = subprocess.Popen(recv_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError as exc:
        missing = Path(exc.filename or send_argv[0]).name
        raise ProgramMissing(f"{missing} is not installed", program=missing) from exc
    moved = [0]
    errors: dict[str, bytes] = {}

    def pump() -> None:
        assert sender.stdout is not None and receiver.stdin is not None
        try:
            fd = sender.stdout.fileno()
            while chunk := os.read(fd, CHUNK):
                receiver.stdin.write(chunk)
                moved[0] += len(chunk)
        except BrokenPipeError:
            pass            # the receiver ended early; its exit code says why
        finally:
            for end in (receiver.stdin, sender.stdout):
                try:
                    end.close()     # the sender gets SIGPIPE rather than block
                except BrokenPipeError:
                    pass

    def drain(name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        errors[name] = proc.stderr.read()

    threads = [threading.Thread(target=pump, daemon=True),
               threading.Thread(target=drain, args=("send", sender), daemon=True),
               threading.Thread(target=drain, args=("receive", receiver), daemon=True)]
    for t in threads:
        t.start()
    deadline = started + timeout
    try:
        for proc in (sender, receiver):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        if receiver.stdout is not None:
            receiver.stdout.read()
    except BaseException:
        for proc in (sender, receiver):
            _kill_group(proc)
        _remove_partial(received)
        raise TransferFailed(f"send | btrfs receive of {snapshot.name} did not finish "
                             f"within {timeout:g} s and was killed",
                             "the partial copy was removed; pull again") from None
    seconds = time.monotonic() - started
    # the receiver first: when it fails, the sender's SIGPIPE is only the consequence
    for step, proc, argv in (("btrfs receive", receiver, recv_argv),
                             (Path(send_argv[0]).name + " " + send_argv[1]
                              if len(send_argv) > 1 else send_argv[0], sender, send_argv)):
        if proc.returncode != 0:
            _remove_partial(received)
            key = "receive" if proc is receiver else "send"
            err = command.failure(command.Result(tuple(argv), proc.returncode or 0, "",
                                                 errors.get(key, b"").decode(errors="replace"),
                                                 seconds))
            raise TransferFailed(f"{step} of {snapshot.name} failed: {err.message}",
                                 "the partial copy was removed; " + err.hint) from err
    log.info("snapshot received", extra={"snapshot": name, "dest": str(dest_dir),
                                         "bytes": moved[0], "seconds": round(seconds, 3)})
    return moved[0], seconds


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _remove_partial(path: Path) -> None:
    if path.exists():
        try:
            delete_subvolume(path)
        except Exception:   # noqa: BLE001 - best effort; the original error matters more
            log.warning("partial copy left", extra={"path": str(path)})


def clone_writable(src: Path, dest: Path) -> None:
    """A writable snapshot of `src` (e.g. of a read-only snapshot) at `dest`, on the
    same filesystem: a restore's scratch copy, made in constant time."""
    command.run([BTRFS, "subvolume", "snapshot", src, dest], timeout=60)
    log.info("writable clone made", extra={"src": str(src), "dest": str(dest)})
