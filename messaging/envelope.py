"""Framing: every message is `[topic, body]` with a JSON body (plus the identity
frame ROUTER sockets add). Nothing outside messaging/ builds or parses frames.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from messaging.channels import CHANNELS, PROTOCOL_VERSION
from messaging.errors import ProtocolError
from messaging.messages import MESSAGE_TYPES, check_args

ENVELOPE_FIELDS = ("v", "type", "id", "sender", "ts")

# Message ids: a random per-process prefix and a counter. Unique across processes
# and cheap (uuid4 per message showed in the balancer's profile).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


def _reseed() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(4).hex()


os.register_at_fork(after_in_child=_reseed)


@dataclass
class Message:
    type: str
    fields: dict[str, Any]
    id: str = field(default_factory=new_id)
    sender: str = ""
    ts: float = field(default_factory=time.time)
    v: int = PROTOCOL_VERSION

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def make(type_: str, sender: str = "", **fields: Any) -> Message:
    """Build a message, checking its fields against the declaration."""
    msg = Message(type_, fields, sender=sender)
    _validate(msg)
    return msg


def command(action: str, sender: str = "", **args: Any) -> Message:
    """A control command; its args are checked against ACTIONS."""
    check_args(action, args)
    return make("command", sender, action=action, args=args)


def reply(to: Message, sender: str = "", *, result: dict[str, Any] | None = None,
          error: dict[str, Any] | None = None) -> Message:
    return make("reply", sender, re=to.id, ok=error is None, result=result or {},
                error=error)


def pack_bytes(data: bytes) -> str:
    """Bytes inside a JSON body (a run's streams): base64."""
    return base64.b64encode(data).decode("ascii")


def unpack_bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"stream data is not base64: {exc}") from exc


def _validate(msg: Message) -> None:
    decl = MESSAGE_TYPES.get(msg.type)
    if decl is None:
        raise ProtocolError(f"unknown message type {msg.type!r}")
    for name, typ in decl.required.items():
        if name not in msg.fields:
            raise ProtocolError(f"{msg.type} message lacks field {name!r}")
        if not isinstance(msg.fields[name], typ):
            raise ProtocolError(f"{msg.type}.{name} has type "
                                f"{type(msg.fields[name]).__name__}")
    for name, typ in decl.optional.items():
        if name in msg.fields and not isinstance(msg.fields[name], typ):
            raise ProtocolError(f"{msg.type}.{name} has type "
                                f"{type(msg.fields[name]).__name__}")


def encode(msg: Message) -> list[bytes]:
    body = {"v": msg.v, "type": msg.type, "id": msg.id, "sender": msg.sender,
            "ts": msg.ts, **msg.fields}
    return [msg.type.encode(), json.dumps(body, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> Message:
    if len(frames) != 2:
        raise ProtocolError(f"expected [topic, body], got {len(frames)} frames")
    try:
        body = json.loads(frames[1])
    except ValueError as exc:
        raise ProtocolError(f"message body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("message body is not a JSON object")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {body.get('v')!r} is not "
                            f"{PROTOCOL_VERSION}", "run the same Berth version everywhere")
    if frames[0].decode(errors="replace") != body.get("type"):
        raise ProtocolError("topic frame does not match the body's type")
    fields = {k: v for k, v in body.items() if k not in ENVELOPE_FIELDS}
    msg = Message(str(body["type"]), fields, id=str(body.get("id", "")),
                  sender=str(body.get("sender", "")), ts=float(body.get("ts", 0)))
    _validate(msg)
    return msg


def subscribe_upstream(sock: zmq.Socket, channel: str) -> None:
    """An XSUB end (a forwarder) asks its publishers for every message type of the
    channel: XSUB subscribes by sending a frame of 0x01 + topic."""
    for topic in CHANNELS[channel].messages:
        sock.send(b"\x01" + topic.encode())


def _frames(msg: Message, identity: bytes | None) -> list[bytes]:
    frames = encode(msg)
    return [identity, *frames] if identity is not None else frames


def _split(sock: zmq.Socket, frames: list[bytes]) -> tuple[bytes | None, Message]:
    identity = None
    if sock.type == zmq.ROUTER:
        identity, frames = frames[0], frames[1:]
    return identity, decode(frames)


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None,
         flags: int = 0) -> None:
    """Send on any channel socket; ROUTER ends pass the peer identity."""
    sock.send_multipart(_frames(msg, identity), flags=flags)


def recv(sock: zmq.Socket, flags: int = 0) -> tuple[bytes | None, Message]:
    """Receive one message; returns (identity or None, message)."""
    return _split(sock, sock.recv_multipart(flags=flags))


async def send_async(sock: zmq.asyncio.Socket, msg: Message, identity: bytes | None = None) -> None:
    """`send` for a zmq.asyncio socket."""
    await sock.send_multipart(_frames(msg, identity))


async def recv_async(sock: zmq.asyncio.Socket) -> tuple[bytes | None, Message]:
    """`recv` for a zmq.asyncio socket."""
    return _split(sock, await sock.recv_multipart())
