"""Parsing and framing decisions from raw bytes (sans-IO: no sockets needed).

Request vectors live in vectors/<expected>-<what>.http, where <expected> is `ok` or
the status the balancer must answer (400, 431, 501, 505)."""
from __future__ import annotations

from pathlib import Path

import pytest

from balancer import http1
from balancer.errors import BackendError, BadRequest

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.http"))


def decide(raw: bytes, max_bytes: int = 65536) -> tuple[http1.Request, bytes]:
    """What the proxy does with raw bytes: the parsed request and its decoded body;
    raises BadRequest for anything it must refuse."""
    found = http1.find_head(raw, max_bytes)
    assert found, "head incomplete"
    start, end = found
    req = http1.parse_request(raw[start:end])
    rest = raw[end:]
    if req.framing.kind == "chunked":
        dec = http1.ChunkedDecoder()
        body = b"".join(dec.feed(rest))
        assert dec.done, "chunked body incomplete"
        return req, body
    return req, rest[:req.framing.length]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    expected = path.stem.split("-", 1)[0]
    raw = path.read_bytes()
    if expected == "ok":
        decide(raw)
    else:
        with pytest.raises(BadRequest) as info:
            decide(raw)
        assert info.value.status == int(expected), info.value.message


def test_vectors_cover_the_smuggling_families() -> None:
    names = {p.stem for p in VECTORS}
    for needed in ("400-cl-te", "400-te-cl", "400-te-xchunked", "400-cl-differing-duplicates",
                   "400-obs-fold", "400-space-before-colon", "400-missing-host",
                   "400-duplicate-host", "400-chunk-size-not-hex"):
        assert needed in names


def test_head_incomplete_then_too_large() -> None:
    assert http1.find_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 100) is None
    with pytest.raises(BadRequest) as info:
        http1.find_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, 100)
    assert info.value.status == 431
    with pytest.raises(BadRequest) as info:
        http1.find_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n", 100)
    assert info.value.status == 431


def test_request_fields() -> None:
    req, body = decide(b"POST /p?q=1 HTTP/1.1\r\nHost: A.localhost:80\r\n"
                       b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\nabcEXTRA")
    assert (req.method, req.target, req.version, req.host) == \
        ("POST", "/p?q=1", (1, 1), "A.localhost:80")
    assert req.framing == http1.Framing("length", 3) and body == b"abc"
    assert req.keep_alive and req.expect_continue and not req.idempotent


def test_absolute_form_takes_host_from_target() -> None:
    req, _ = decide(b"GET http://a.localhost/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
    assert req.host == "a.localhost" and req.target == "/x?y"


@pytest.mark.parametrize("raw,keep", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
])
def test_keep_alive(raw: bytes, keep: bool) -> None:
    assert decide(raw)[0].keep_alive is keep


def test_hop_by_hop_headers_are_removed_and_forwarded_ones_set() -> None:
    req, _ = decide(
        b"POST / HTTP/1.0\r\nHost: a.localhost\r\nConnection: keep-alive, X-Private\r\n"
        b"X-Private: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X\r\n"
        b"Upgrade: websocket\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Keep: yes\r\nContent-Length: 2\r\n\r\nhi")
    head = http1.backend_request_head(req, client_addr="127.0.0.9", port=8000,
                                      req_id="rid").decode()
    lines = head.split("\r\n")
    assert lines[0] == "POST / HTTP/1.1"
    names = [line.split(":")[0].lower() for line in lines[1:] if line]
    for gone in ("connection", "x-private", "keep-alive", "te", "trailer", "upgrade",
                 "proxy-connection"):
        assert gone not in names
    assert "X-Keep: yes" in lines and "Host: a.localhost" in lines
    assert "X-Forwarded-For: 127.0.0.9" in lines and "X-Forwarded-Proto: http" in lines
    assert "X-Forwarded-Host: a.localhost" in lines and "X-Forwarded-Port: 8000" in lines
    assert "X-Request-ID: rid" in lines and "Content-Length: 2" in lines
    assert names.count("x-forwarded-for") == 1
    assert head.endswith("\r\n\r\n")


def test_chunked_request_is_reframed_for_the_backend() -> None:
    req, _ = decide(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"0\r\n\r\n")
    head = http1.backend_request_head(req, client_addr="1.2.3.4", port=1, req_id="r")
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head


def test_request_id_is_kept_when_sane() -> None:
    h = http1.Headers([("X-Request-ID", "abc-123")])
    assert http1.request_id(h) == "abc-123"
    bad = http1.request_id(http1.Headers([("X-Request-ID", "a b<script>")]))
    assert bad != "a b<script>" and len(bad) == 32


def test_chunked_decoder_incremental_with_leftover() -> None:
    raw = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nTrailer: v\r\n\r\nNEXT"
    dec = http1.ChunkedDecoder()
    out = b""
    for i in range(len(raw)):             # one byte at a time
        out += b"".join(dec.feed(raw[i:i + 1]))
        if dec.done:
            rest = dec.leftover + raw[i + 1:]
            break
    assert out == b"hello world" and rest == b"NEXT"


@pytest.mark.parametrize("method,status,headers,kind", [
    ("HEAD", 200, [("Content-Length", "10")], "none"),
    ("GET", 204, [], "none"),
    ("GET", 304, [("Content-Length", "10")], "none"),
    ("GET", 100, [], "none"),
    ("GET", 200, [("Transfer-Encoding", "chunked"), ("Content-Length", "3")], "chunked"),
    ("GET", 200, [("Transfer-Encoding", "gzip")], "close"),
    ("GET", 200, [("Content-Length", "3")], "length"),
    ("GET", 200, [], "close"),
])
def test_response_framing(method, status, headers, kind) -> None:
    assert http1.response_framing(method, status, http1.Headers(headers)).kind == kind


def test_response_head_parsing_and_rewriting() -> None:
    resp = http1.parse_response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: 5\r\nX-App: yes\r\n\r\n", "GET")
    assert resp.status == 200 and not resp.keep_alive
    head = http1.client_response_head(resp, framing_out="length", keep_alive=True,
                                      req_id="r").decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "X-Hop" not in head and "Keep-Alive" not in head
    assert "X-App: yes" in head and "Content-Length: 2" in head
    assert "Connection: keep-alive" in head and "X-Request-ID: r" in head
    head = http1.client_response_head(resp, framing_out="chunked", keep_alive=True,
                                      req_id="r").decode()
    assert "Content-Length" not in head and "Transfer-Encoding: chunked" in head


def test_invalid_response_is_a_backend_error() -> None:
    with pytest.raises(BackendError):
        http1.parse_response(b"HTTP/1.1 2000 OK\r\n\r\n", "GET")
    with pytest.raises(BackendError):
        http1.parse_response(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "GET")
    with pytest.raises(BackendError):
        http1.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "GET")
