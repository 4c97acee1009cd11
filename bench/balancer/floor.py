"""The fastest an eventlet proxy gets on this machine: a floor for the balancer, not a
proxy to use. One green thread per client, one backend connection per client,
responses framed by Content-Length only, no header checks, no access log, no
timeouts. `run.py --targets ...,floor` measures it beside the real balancer, so
the gap between the two is what Berth's own per-request work costs.

    python bench/balancer/floor.py LISTEN_PORT BACKEND_PORT
"""
from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")   # eventlet's deprecation notice

import eventlet  # noqa: E402
from eventlet.green import socket  # noqa: E402

BUFSIZE = 65536


def read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """(head, rest) once a blank line arrived; (b"", b"") when the peer closed."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end + 4], buf[end + 4:]
        data = sock.recv(BUFSIZE)
        if not data:
            return b"", b""
        buf += data


def content_length(head: bytes) -> int:
    low = head.lower()
    at = low.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    return int(low[at + 17:low.index(b"\r\n", at + 17)])


def serve(client: socket.socket, backend_port: int) -> None:
    backend = socket.create_connection(("127.0.0.1", backend_port))
    for s in (client, backend):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cbuf = bbuf = b""
    try:
        while True:
            head, cbuf = read_head(client, cbuf)
            if not head:
                return
            close = b"connection: close" in head.lower()
            backend.sendall(head.replace(b"onnection: close", b"onnection: keep-alive"))
            rhead, bbuf = read_head(backend, bbuf)
            if not rhead:
                return
            if close:
                rhead = rhead.replace(b"onnection: keep-alive", b"onnection: close")
            remaining = content_length(rhead) - len(bbuf)
            out = [rhead, bbuf]
            bbuf = b""
            client.sendall(b"".join(out))
            while remaining > 0:
                data = backend.recv(min(BUFSIZE, remaining))
                if not data:
                    return
                remaining -= len(data)
                client.sendall(data)
            if close:
                return
    except OSError:
        pass
    finally:
        backend.close()
        client.close()


def main() -> None:
    port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    listener = eventlet.listen(("127.0.0.1", port), backlog=1024)
    pool = eventlet.GreenPool(100000)
    while True:
        sock, _ = listener.accept()
        pool.spawn_n(serve, sock, backend_port)


if __name__ == "__main__":
    main()
