"""The API server's head parser and its split of long requests (no sockets)."""
from __future__ import annotations

import pytest

from controller.api import ROUTES, SCOPES, is_long
from controller.httpserver import Refused, parse_head


def test_a_whole_head_is_parsed_and_an_incomplete_one_waits():
    head = parse_head(b"\r\nPOST /v1/apps HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"name\"", 1024)
    assert head is not None and (head.method, head.target, head.content_length) == (
        "POST", "/v1/apps", 12)
    assert parse_head(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\n", 1024) is None


@pytest.mark.parametrize("data,status,needle", [
    (b"GET / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "'1e3' is not a number"),
    (b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400, "not a number"),
    (b"GET / HTTP/1.1\r\n : x\r\n\r\n", 400, "malformed header"),
    (b"GET / HTTP/1.1\r\nBad : x\r\n\r\n", 400, "malformed header"),
    (b"GET /\r\n\r\n", 400, "malformed request line"),
    (b"GET / SPDY/3\r\n\r\n", 400, "malformed request line"),
    (b"GET / HTTP/2.0\r\n\r\n", 400, "HTTP version"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "Content-Length"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 431, "over 1 kB"),
])
def test_malformed_heads_are_refused_with_what_was_wrong(data, status, needle):
    with pytest.raises(Refused) as err:
        parse_head(data, 1024)
    assert err.value.status == status and needle in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("method,target,long", [
    ("GET", "/v1/apps/a/logs?follow=1", True),
    ("GET", "/v1/apps/a/logs?lines=5", False),
    ("GET", "/v1/stats?count=2&follow=true", True),
    ("POST", "/v1/apps/a/builds", True),
    ("GET", "/v1/builds/abc/log", True),
    ("GET", "/v1/builds/abc", False),
    ("GET", "/v1/runs/abc/attach", True),
    ("GET", "/v1/slugs/" + "0" * 64, False),
    ("POST", "/v1/apps", False),
])
def test_requests_that_last_get_their_own_threads(method, target, long):
    assert is_long(method, target) is long


def test_every_route_declares_its_scope():
    assert {name for _, _, name in ROUTES} <= set(SCOPES)
