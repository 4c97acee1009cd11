"""The fastest an asyncio proxy gets on this machine: a floor for the balancer's
asyncio engine, not a proxy to use. uvloop (when installed) and bare Protocols:
one backend connection per client, responses framed by Content-Length only, no
header checks, no access log, no timeouts, no coroutine at all. `run.py
--targets ...,floor-aio` measures it beside the real balancer, so the table splits
the distance to HAProxy into the loop's cost (this floor) and Berth's own.

    python bench/balancer/aio_floor.py LISTEN_PORT BACKEND_PORT
"""
from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any


def content_length(head: bytes) -> int:
    low = head.lower()
    at = low.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    return int(low[at + 17:low.index(b"\r\n", at + 17)])


class Backend(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: Any = None
        self.buf = b""
        self.remaining = -1        # body bytes still to relay; -1: reading a head

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.client.backend_ready(self)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.remaining < 0:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.buf[:end + 4], self.buf[end + 4:]
            self.buf = b""
            self.remaining = content_length(head)
            if client.close_after:
                head = head.replace(b"onnection: keep-alive", b"onnection: close")
            client.transport.write(head)
        if data:
            client.transport.write(data)
            self.remaining -= len(data)
        if self.remaining <= 0:
            self.remaining = -1
            client.response_done()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.transport: Any = None
        self.backend: Backend | None = None
        self.buf = b""
        self.pending: list[bytes] = []
        self.close_after = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: Backend(self), "127.0.0.1",
                                                self.backend_port))

    def backend_ready(self, backend: Backend) -> None:
        self.backend = backend
        for head in self.pending:
            backend.transport.write(head)
        self.pending = []

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
            if b"onnection: close" in head:
                self.close_after = True
                head = head.replace(b"onnection: close", b"onnection: keep-alive")
            if self.backend is None:
                self.pending.append(head)
            else:
                self.backend.transport.write(head)

    def response_done(self) -> None:
        if self.close_after:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.backend is not None:
            self.backend.transport.close()


async def main() -> None:
    port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await asyncio.get_running_loop().create_server(
        lambda: Client(backend_port), sock=sock, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
