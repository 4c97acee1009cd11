"""The one API client every CLI command goes through."""
from __future__ import annotations

import http.client
import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cli.credentials import Credentials
from cli.credentials import load as load_credentials
from messaging.errors import BerthError


class Client:
    def __init__(self, creds: Credentials | None = None, timeout: float = 60.0) -> None:
        self.creds = creds or load_credentials()
        url = urlsplit(self.creds.api_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.timeout = timeout

    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port,
                                          timeout=timeout or self.timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.creds.token}", **(extra or {})}

    def _unreachable(self, exc: Exception) -> BerthError:
        return BerthError(f"cannot reach the Berth API at {self.creds.api_url}: {exc}",
                          "is the platform running? start it with `berth up`",
                          code="unreachable", status=503)

    @staticmethod
    def _raise_for(resp: http.client.HTTPResponse, data: bytes) -> None:
        if resp.status < 400:
            return
        try:
            err = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            err = {"message": f"the API answered {resp.status}: {data[:200]!r}"}
        raise BerthError.from_dict(err, status=resp.status)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        conn = self._conn()
        try:
            conn.request(method, path, body=payload,
                         headers=self._headers({"Content-Type": "application/json"}))
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise self._unreachable(exc) from exc
        finally:
            conn.close()
        self._raise_for(resp, data)
        return json.loads(data) if data else {}

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, path: str, file: Path, progress: Callable[[int], None]) -> Any:
        """POST a file in chunks, calling progress(bytes) as it goes."""
        size = file.stat().st_size
        conn = self._conn(timeout=600)
        try:
            conn.putrequest("POST", path)
            for k, v in self._headers({"Content-Type": "application/gzip",
                                       "Content-Length": str(size)}).items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                with open(file, "rb") as fh:
                    while chunk := fh.read(1 << 16):
                        conn.send(chunk)
                        progress(len(chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass                     # the server refused early; its answer says why
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise self._unreachable(exc) from exc
        finally:
            conn.close()
        self._raise_for(resp, data)
        return json.loads(data)

    def upgrade(self, path: str, protocol: str) -> tuple[socket.socket, bytes]:
        """GET `path` asking to switch to `protocol`; after the 101, the connected socket
        and whatever bytes of the new protocol came with the answer."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Authorization: Bearer {self.creds.token}\r\n"
                          f"Connection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk or len(data) > 1 << 16:
                    raise ConnectionError("the API closed the connection")
                data += chunk
        except OSError as exc:
            raise self._unreachable(exc) from exc
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, _, header_block = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status == 101:
            sock.settimeout(None)
            return sock, rest
        headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
        length = int(headers.get("Content-Length") or 0)
        try:
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        except OSError:
            pass
        finally:
            sock.close()
        try:
            err = json.loads(rest)["error"]
        except (ValueError, KeyError, TypeError):
            err = {"message": f"the API answered {status} to an upgrade: {rest[:200]!r}"}
        raise BerthError.from_dict(err, status=status or 502)

    def stream(self, path: str, method: str = "GET", body: Any = None) -> Iterator[str]:
        """Yield lines of a streamed (chunked) text response as they come."""
        conn = self._conn(timeout=3600)
        try:
            if body is None:
                conn.request(method, path, headers=self._headers())
            else:
                conn.request(method, path, body=json.dumps(body).encode(),
                             headers=self._headers({"Content-Type": "application/json"}))
            resp = conn.getresponse()
            if resp.status >= 400:
                self._raise_for(resp, resp.read())
            buf = b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
            if buf:
                yield buf.decode("utf-8", errors="replace")
        except OSError as exc:
            raise self._unreachable(exc) from exc
        finally:
            conn.close()
