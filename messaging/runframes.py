"""The frames of an attached one-off run between the CLI and the controller's API.

`berth run` asks for `GET /v1/runs/<id>/attach` with `Connection: Upgrade` and
`Upgrade: UPGRADE`; the API answers `101 Switching Protocols` and from then on the
connection carries frames both ways: a 1-byte kind, a 4-byte big-endian payload
length, the payload. Sans-IO: `FrameReader.feed` takes whatever bytes arrived and
returns the whole frames among them.

Client -> controller: STDIN (bytes), STDIN_EOF, RESIZE (cols, rows), SIGNAL (a name
in messaging.messages.RUN_SIGNALS). Controller -> client: OUTPUT (the terminal, or
stdout), STDERR, EXIT (JSON {code, reason}, last), ERROR (JSON {code, message, hint},
last: the run could not start or the controller lost it).

This module imports no pyzmq: the CLI uses it.
"""
from __future__ import annotations

import json
import struct
from typing import Any

from messaging.errors import ProtocolError
from messaging.messages import RUN_SIGNALS

UPGRADE = "berth-run/1"
MAX_FRAME = 1 << 20

STDIN = b"i"
STDIN_EOF = b"e"
RESIZE = b"w"
SIGNAL = b"s"
OUTPUT = b"o"
STDERR = b"r"
EXIT = b"x"
ERROR = b"!"
KINDS = frozenset({STDIN, STDIN_EOF, RESIZE, SIGNAL, OUTPUT, STDERR, EXIT, ERROR})

_HEAD = struct.Struct(">cI")
_SIZE = struct.Struct(">HH")

# a run's stream name (run_output.stream) -> the frame kind that carries it
STREAM_KINDS = {"tty": OUTPUT, "stdout": OUTPUT, "stderr": STDERR}


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if kind not in KINDS:
        raise ProtocolError(f"unknown run frame kind {kind!r}")
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"run frame of {len(payload)} bytes is over {MAX_FRAME}")
    return _HEAD.pack(kind, len(payload)) + payload


def resize(cols: int, rows: int) -> bytes:
    return frame(RESIZE, _SIZE.pack(max(0, min(cols, 0xFFFF)), max(0, min(rows, 0xFFFF))))


def parse_resize(payload: bytes) -> tuple[int, int]:
    """(cols, rows)"""
    if len(payload) != _SIZE.size:
        raise ProtocolError("a resize frame carries 4 bytes")
    cols, rows = _SIZE.unpack(payload)
    return int(cols), int(rows)


def signal(name: str) -> bytes:
    check_signal(name)
    return frame(SIGNAL, name.encode())


def check_signal(name: str) -> str:
    if name not in RUN_SIGNALS:
        raise ProtocolError(f"signal {name!r} cannot be sent to a run",
                            f"send one of {', '.join(RUN_SIGNALS)}")
    return name


def exit_frame(code: int, reason: str = "") -> bytes:
    return frame(EXIT, json.dumps({"code": code, "reason": reason}).encode())


def error_frame(error: dict[str, Any]) -> bytes:
    return frame(ERROR, json.dumps(error).encode())


def parse_json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"run frame is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("run frame is not a JSON object")
    return data


class FrameReader:
    """Bytes in, whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= _HEAD.size:
            kind, length = _HEAD.unpack_from(self._buf)
            if kind not in KINDS:
                raise ProtocolError(f"unknown run frame kind {kind!r}",
                                    "run the same Berth version as the controller")
            if length > MAX_FRAME:
                raise ProtocolError(f"run frame of {length} bytes is over {MAX_FRAME}")
            end = _HEAD.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[_HEAD.size:end])))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
