"""The served host's side of the btrfs offsite pull: a forced command.

The offsite host's public key goes into the served host's backup user's
authorized_keys as `command="python -m backup.forced <snapshots dir>",restrict`, so
whatever the offsite host asks for arrives in SSH_ORIGINAL_COMMAND and only this runs:
- `list`: the read-only snapshot names, one a line;
- `send <name> [<parent>]`: `btrfs send [-p parent]` of that snapshot to stdout;
- `manifest <name>`: the snapshot's manifest file.
Names must be snapshot names (`<volume>@<time>`, no path) of read-only subvolumes in
that one directory; anything else is refused (exit 2). Nothing here can change or
delete anything, and the served host holds no key for the offsite host.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from . import btrfs, manifest
from .snapshots import NAME


def _snapshot(root: Path, name: str) -> Path:
    if not NAME.match(name):
        raise PermissionError(f"not a snapshot name: {name!r}")
    path = root / name
    if not (btrfs.is_subvolume(path) and btrfs.is_readonly(path)):
        raise PermissionError(f"no read-only snapshot {name!r}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backup.forced <snapshots dir>", file=sys.stderr)
        return 2
    root = Path(args[0])
    try:
        request = shlex.split(os.environ.get("SSH_ORIGINAL_COMMAND", ""))
    except ValueError:
        request = []
    try:
        if request == ["list"]:
            for entry in sorted(root.iterdir()):
                if NAME.match(entry.name):
                    print(entry.name)
            return 0
        if len(request) == 2 and request[0] == "manifest":
            path = _snapshot(root, request[1])
            sys.stdout.buffer.write(manifest.manifest_path(path).read_bytes())
            return 0
        if len(request) in (2, 3) and request[0] == "send":
            snap = _snapshot(root, request[1])
            parent = ["-p", str(_snapshot(root, request[2]))] if len(request) == 3 else []
            sys.stdout.flush()
            os.execvp(btrfs.BTRFS, [btrfs.BTRFS, "send", "-q", *parent, str(snap)])
    except (PermissionError, FileNotFoundError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(f"refused: {' '.join(request) or '(nothing)'} (allowed: list, send NAME "
          f"[PARENT], manifest NAME)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
