"""The whole-head fast path of http1.parse_request/parse_response against the
line-by-line parser: for every head, both give the same request (or response) or
the same refusal. The fast path may hand a head to the slow one, never accept more."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from balancer import http1
from balancer.errors import BackendError, BadRequest

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.http"))

EXTRA_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a\r\nX:\r\nY: \t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a  \t\r\nX: v a l\tue \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\t: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n X: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX(: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nnocolon\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\nHOST: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    b"GET / HTTP/1.9\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / http/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"G\xe9T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\xe9 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\xe9 HTTP/1.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://u@b/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1234567890123456789\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xb2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 200\r\n\r\n",
    b"HTTP/1.1 200 \r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 2\xb200 OK\r\n\r\n",
    b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX : y\r\n\r\n",
]


def _head(raw: bytes) -> bytes:
    found = http1.find_head(raw, 65536)
    assert found
    return raw[found[0]:found[1]]


def _outcome(parse, head: bytes):  # type: ignore[no-untyped-def]
    try:
        return parse(head)
    except (BadRequest, BackendError) as exc:
        return type(exc).__name__, exc.status


def _request_heads() -> list[bytes]:
    heads = []
    for raw in [p.read_bytes() for p in VECTORS] + EXTRA_REQUESTS:
        try:
            heads.append(_head(raw))
        except BadRequest:
            pass     # refused before parsing: nothing to compare
    return heads


@pytest.mark.parametrize("head", _request_heads())
def test_request_fast_path_agrees_with_line_parser(head: bytes) -> None:
    assert _outcome(http1.parse_request, head) == \
        _outcome(http1._parse_request_lines, head)


@pytest.mark.parametrize("head", RESPONSES)
def test_response_fast_path_agrees_with_line_parser(head: bytes) -> None:
    def fast(h: bytes) -> tuple[object, ...]:
        r = http1.parse_response(h, "GET")
        return r.status, r.reason, r.version, r.headers, r.framing

    def slow(h: bytes) -> tuple[object, ...]:
        status, reason, version, headers = http1._parse_response_lines(h)
        return (status, reason, version, headers,
                http1.response_framing("GET", status, headers))

    assert _outcome(fast, head) == _outcome(slow, head)


def test_status_digits_must_be_ascii() -> None:
    with pytest.raises(BackendError):
        http1.parse_response(b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n", "GET")


def test_generated_request_ids_are_distinct_hex() -> None:
    ids = {http1.request_id(http1.Headers()) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_headers_index_matches_items() -> None:
    req = http1.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n"
                              b"Connection: keep-alive, X-A\r\n\r\n")
    assert req.headers.get_all("X-A") == ["1", "2"]
    assert req.headers.connection == ["keep-alive", "x-a"]
    assert "x-a" in http1.hop_by_hop(req.headers)
    head = http1.backend_request_head(req, client_addr="1.2.3.4", port=1, req_id="r")
    assert b"X-A" not in head and b"x-a" not in head
