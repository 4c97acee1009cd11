"""A tiny WebSocket echo server (RFC 6455) for the balancer's tests, stdlib only.

`python wsecho.py HOST PORT`: GET /ws with a WebSocket handshake switches protocols
and echoes every text/binary frame back (unmasked, as a server must), answers ping
with pong and close with close. GET /ws without an Upgrade, or any other path, gets
an ordinary 200 saying it did not upgrade (so a declined upgrade can be tested).
"""
from __future__ import annotations

import base64
import hashlib
import socket
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def read_exact(sock: socket.socket, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


def read_frame(sock: socket.socket, buf: bytearray, masked: bool) -> tuple[int, bytes]:
    b0, b1 = read_exact(sock, 2, buf)
    opcode, length = b0 & 0x0F, b1 & 0x7F
    if bool(b1 & 0x80) != masked:
        raise ValueError("mask bit wrong")
    if length == 126:
        length = struct.unpack("!H", read_exact(sock, 2, buf))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(sock, 8, buf))[0]
    mask = read_exact(sock, 4, buf) if masked else b""
    data = read_exact(sock, length, buf)
    if masked:
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
    return opcode, data


def frame(opcode: int, data: bytes, mask: bytes = b"") -> bytes:
    n = len(data)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if mask:
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
    return head + mask + data


def serve(sock: socket.socket) -> None:
    with sock:
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip()
                   for k, v in (line.split(":", 1) for line in lines[1:])}
        if path != "/ws" or headers.get("upgrade", "").lower() != "websocket":
            body = f"no upgrade path={path} upgrade={headers.get('upgrade', '-')}".encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                         b"\r\n\r\n%s" % (len(body), body))
            return
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: "
                      f"{accept_key(headers['sec-websocket-key'])}\r\n\r\n").encode())
        try:
            while True:
                opcode, data = read_frame(sock, buf, masked=True)
                if opcode == 8:
                    sock.sendall(frame(8, data[:2]))
                    return
                if opcode == 9:
                    sock.sendall(frame(10, data))
                elif opcode in (1, 2):
                    sock.sendall(frame(opcode, data))
        except (ConnectionError, OSError, ValueError):
            return


def main() -> None:
    listener = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=128)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
