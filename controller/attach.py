"""One `berth run` client's upgraded connection (after `101 Switching Protocols`).

The API thread that answered the upgrade owns the socket for the rest of the run:
it reads the client's frames (messaging/runframes.py) and hands them to the run's
Attachment, while a second thread writes the run's output frames to the client and
tells the Attachment how many bytes went out (so the loop acknowledges them to the
runner). The client sends nothing before the 101, so no frame can hide in the HTTP
server's read buffer: the socket is read directly. The loop is never waited on:
both threads only touch the Attachment's queues.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
import time

from controller.runs import LINGER, Attachment
from messaging.errors import ProtocolError
from messaging.runframes import FrameReader

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


def serve(conn: socket.socket, att: Attachment, stopping: threading.Event) -> None:
    """Pump frames both ways until the run is over and its last frame is out (then
    at most LINGER seconds for the client to close), or the client goes away."""
    writer = threading.Thread(target=_write, args=(conn, att, stopping),
                              name="run-client-writer", daemon=True)
    writer.start()
    reader = FrameReader()
    finished_at: float | None = None
    try:
        while not stopping.is_set():
            if not writer.is_alive():
                finished_at = finished_at or time.monotonic()
                if not att.finished.is_set() or time.monotonic() - finished_at > LINGER:
                    break
            ready, _, _ = select.select([conn], [], [], 0.5)
            if not ready:
                continue
            data = conn.recv(READ_SIZE)
            if not data:
                break
            for kind, payload in reader.feed(data):
                att.client_sent(kind, payload)
    except ProtocolError as exc:
        log.warning("run client sent a bad frame", extra={"error": exc.message})
    except OSError:
        pass
    finally:
        if not att.finished.is_set() or writer.is_alive():
            att.hang_up()
        writer.join(5.0)


def _write(conn: socket.socket, att: Attachment, stopping: threading.Event) -> None:
    try:
        while not stopping.is_set() and not att.gone():
            item = att.next_frame(0.5)
            if item is None:
                continue
            frame, n, final = item
            conn.sendall(frame)
            att.sent(n)
            if final:
                conn.shutdown(socket.SHUT_WR)   # the client reads EOF after the last frame
                return
    except OSError:
        att.hang_up()
