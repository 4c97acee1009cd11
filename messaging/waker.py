"""Wake a ZeroMQ poll loop from other threads without touching its sockets.

A loop that owns its sockets polls them with a timeout; work handed to it by other
threads (a pty reader's output, a client's keystrokes) would wait for that timeout.
A Waker is a non-blocking self-pipe whose read end the loop registers with its
zmq.Poller (which polls plain file descriptors too): `wake()` from any thread makes
the poll return at once; the loop calls `clear()` and then looks at its queues.
"""
from __future__ import annotations

import os


class Waker:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        """The end to poll for reading."""
        return self._r

    def wake(self) -> None:
        """Thread-safe; a full pipe already means the loop will wake."""
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
