"""Parsing and framing decisions from raw bytes (sans-IO: no sockets needed).

Request vectors live in vectors/<expected>-<what>.http, where <expected> is `ok` or
the status the balancer must answer (400, 431, 501, 505)."""
from __future__ import annotations

from pathlib import Path

import pytest

from balancer import http1
from balancer.errors import BackendError, BadRequest

VECTORS = sorted((Path(__file__).parent / "vectors").glob("*.http"))


def frame(raw: bytes, max_bytes: int = 65536) -> tuple[http1.Request, bytes, bytes]:
    """What the proxy does with raw bytes: the parsed request, its decoded body and
    the bytes past that body (what the connection would read as the next request);
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
        return req, body, dec.leftover
    length = req.framing.length if req.framing.kind == "length" else 0
    assert len(rest) >= length, "length body incomplete"
    return req, rest[:length], rest[length:]


def decide(raw: bytes, max_bytes: int = 65536) -> tuple[http1.Request, bytes]:
    """The parsed request and its decoded body (see frame)."""
    req, body, _ = frame(raw, max_bytes)
    return req, body


def backend_lines(req: http1.Request) -> list[str]:
    """The head the backend is sent for `req`, less the X-Forwarded-* and
    X-Request-ID lines every request gets (tested on their own below)."""
    head = http1.backend_request_head(req, client_addr="192.0.2.1", port=80,
                                      req_id="rid").decode("latin-1")
    assert head.endswith("\r\n\r\n")
    return [line for line in head[:-4].split("\r\n")
            if not line.lower().startswith(("x-forwarded-", "x-request-id:"))]


# What each ok-* vector must parse to. Every ok vector needs an entry here
# (test_every_ok_vector_has_an_expectation), so a new one cannot pass by merely not
# raising. `leftover` is what the connection reads after the body: a framing that
# is one byte off would show up there. `backend` is the head sent on, without the
# X-Forwarded-*/X-Request-ID lines.
OK_EXPECTED: dict[str, dict] = {
    "ok-absolute-form": dict(
        method="GET", target="/x", version=(1, 1), host="a.localhost",
        headers=[("Host", "other")], framing=http1.Framing("none"), keep_alive=True,
        body=b"", leftover=b"",
        backend=["GET /x HTTP/1.1", "Host: a.localhost"]),
    "ok-chunked": dict(
        method="POST", target="/", version=(1, 1), host="a",
        headers=[("Host", "a"), ("Transfer-Encoding", "Chunked")],
        framing=http1.Framing("chunked"), keep_alive=True,
        body=b"abc", leftover=b"",          # extension and trailer dropped
        backend=["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked"]),
    "ok-duplicate-identical-cl": dict(
        method="POST", target="/", version=(1, 1), host="a",
        headers=[("Host", "a"), ("Content-Length", "3"), ("Content-Length", "3")],
        framing=http1.Framing("length", 3), keep_alive=True,
        body=b"abc", leftover=b"",
        # the backend sees one Content-Length, never the client's pair
        backend=["POST / HTTP/1.1", "Host: a", "Content-Length: 3"]),
    "ok-http10-no-host": dict(
        method="GET", target="/", version=(1, 0), host="",
        headers=[], framing=http1.Framing("none"), keep_alive=False,
        body=b"", leftover=b"",
        backend=["GET / HTTP/1.1", "Host: "]),
    "ok-leading-crlf": dict(
        method="GET", target="/", version=(1, 1), host="a.localhost",
        headers=[("Host", "a.localhost")], framing=http1.Framing("none"),
        keep_alive=True, body=b"", leftover=b"",
        backend=["GET / HTTP/1.1", "Host: a.localhost"]),
    "ok-simple-get": dict(
        method="GET", target="/", version=(1, 1), host="a.localhost",
        headers=[("Host", "a.localhost")], framing=http1.Framing("none"),
        keep_alive=True, body=b"", leftover=b"",
        backend=["GET / HTTP/1.1", "Host: a.localhost"]),
}


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    expected = path.stem.split("-", 1)[0]
    raw = path.read_bytes()
    if expected == "ok":
        assert path.stem in OK_EXPECTED, f"add what {path.name} must parse to to OK_EXPECTED"
        want = OK_EXPECTED[path.stem]
        req, body, leftover = frame(raw)
        assert (req.method, req.target, req.version, req.host) == \
            (want["method"], want["target"], want["version"], want["host"])
        assert req.headers.items == want["headers"]
        assert req.framing == want["framing"]
        assert req.keep_alive is want["keep_alive"]
        assert (body, leftover) == (want["body"], want["leftover"])
        assert backend_lines(req) == want["backend"]
    else:
        with pytest.raises(BadRequest) as info:
            frame(raw)
        assert info.value.status == int(expected), info.value.message


def test_every_ok_vector_has_an_expectation() -> None:
    ok = {p.stem for p in VECTORS if p.stem.startswith("ok-")}
    assert ok == set(OK_EXPECTED), "OK_EXPECTED and vectors/ok-*.http must match"


# Each request-smuggling family: its vector, and the one edit that removes the
# ambiguity. The vector must be refused with 400 and the edited request accepted
# with the framing and body given, so the refusal is shown to come from that
# family's trick and not from something else wrong with the vector. `stage` is
# where the refusal happens: "head" means before any byte could reach a backend.
SMUGGLING_FAMILIES = {
    "400-cl-te": (b"Content-Length: 6\r\n", b"", "head",
                  http1.Framing("chunked"), b"", b"G"),
    "400-te-cl": (b"Content-Length: 3\r\n", b"", "head",
                  http1.Framing("chunked"), b"SMUGGLED", b""),
    "400-te-xchunked": (b"xchunked", b"chunked", "head",
                        http1.Framing("chunked"), b"", b""),
    "400-te-obs-fold": (b"Transfer-Encoding:\r\n chunked", b"Transfer-Encoding: chunked",
                        "head", http1.Framing("chunked"), b"", b""),
    "400-te-space-before-colon": (b"Transfer-Encoding :", b"Transfer-Encoding:", "head",
                                  http1.Framing("chunked"), b"", b""),
    "400-te-underscore": (b"Transfer_Encoding", b"Transfer-Encoding", "head",
                          http1.Framing("chunked"), b"", b""),
    "400-te-vertical-tab": (b"chunked\x0b", b"chunked", "head",
                            http1.Framing("chunked"), b"", b""),
    "400-cl-differing-duplicates": (b"Content-Length: 0\r\n", b"", "head",
                                    http1.Framing("length", 5), b"abcde", b""),
    "400-obs-fold": (b"one\r\n\ttwo", b"one two", "head", http1.NO_BODY, b"", b""),
    "400-space-before-colon": (b"Host :", b"Host:", "head", http1.NO_BODY, b"", b""),
    "400-missing-host": (b"X: y\r\n", b"Host: a\r\nX: y\r\n", "head",
                         http1.NO_BODY, b"", b""),
    "400-duplicate-host": (b"Host: b\r\n", b"", "head", http1.NO_BODY, b"", b""),
    "400-chunk-size-not-hex": (b"zz\r\n", b"3\r\n", "body",
                               http1.Framing("chunked"), b"abc", b""),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING_FAMILIES))
def test_vectors_cover_the_smuggling_families(name: str) -> None:
    trick, fix, stage, framing, body, leftover = SMUGGLING_FAMILIES[name]
    path = Path(__file__).parent / "vectors" / f"{name}.http"
    raw = path.read_bytes()
    assert raw.count(trick) == 1, f"{path.name} no longer holds {trick!r}"

    found = http1.find_head(raw, 65536)
    assert found
    start, end = found
    if stage == "head":
        with pytest.raises(BadRequest) as info:
            http1.parse_request(raw[start:end])
    else:
        assert http1.parse_request(raw[start:end]).framing.kind == "chunked"
        with pytest.raises(BadRequest) as info:
            http1.ChunkedDecoder().feed(raw[end:])
    assert info.value.status == 400, info.value.message

    req, got_body, got_leftover = frame(raw.replace(trick, fix))
    assert req.framing == framing
    assert (got_body, got_leftover) == (body, leftover)


def test_head_incomplete_then_too_large() -> None:
    assert http1.find_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 100) is None
    with pytest.raises(BadRequest) as info:
        http1.find_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, 100)
    assert info.value.status == 431
    with pytest.raises(BadRequest) as info:
        http1.find_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n", 100)
    assert info.value.status == 431


def test_bare_lf_in_a_complete_head_is_refused_by_the_parser() -> None:
    # find_head leaves a complete head's line endings to the parser (both paths)
    req = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nX-B: 2\r\n\r\n"
    assert http1.find_head(req, 65536) == (0, len(req))
    with pytest.raises(BadRequest) as info:
        http1.parse_request(req)
    assert info.value.status == 400 and "bare LF" in info.value.message
    # a backend's: the app's fault, answered 502
    resp = b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 0\r\n\r\n"
    assert http1.find_head(resp, 65536) == (0, len(resp))
    with pytest.raises(BackendError) as info2:
        http1.parse_response(resp, "GET")
    assert info2.value.status == 502 and "bare LF" in info2.value.message


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
