"""The one API client every CLI command goes through."""
from __future__ import annotations

import http.client
import json
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

    def stream(self, path: str) -> Iterator[str]:
        """Yield lines of a streamed (chunked) text response as they come."""
        conn = self._conn(timeout=3600)
        try:
            conn.request("GET", path, headers=self._headers())
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
