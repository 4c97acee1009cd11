"""Host index over the route table, and the error pages."""
from __future__ import annotations

import json

from balancer import pages
from balancer.routes import RouteIndex, normalize_host
from messaging.shapes import Backend


def test_normalize_host() -> None:
    assert normalize_host("MyApp.LocalHost:8000") == "myapp.localhost"
    assert normalize_host("www.example.com.") == "www.example.com"
    assert normalize_host("[::1]:80") == "[::1]"


def test_index_lookup_and_rebuild() -> None:
    backends = [{"id": "i1", "address": "127.0.0.2", "port": 4000}]
    index = RouteIndex({
        "myapp": {"hosts": ["myapp.localhost", "WWW.Example.com"], "backends": backends,
                  "reason": ""},
        "idle": {"hosts": ["idle.localhost"], "backends": [], "reason": "scale it up"},
    })
    match = index.lookup("www.example.com:80")
    assert match and match.app == "myapp" and match.backends == (Backend("i1", "127.0.0.2", 4000),)
    idle = index.lookup("idle.localhost")
    assert idle and idle.backends == () and idle.reason == "scale it up"
    assert index.lookup("other.localhost") is None
    index.update({"idle": {"hosts": ["idle.localhost"], "backends": backends,
                           "reason": ""}})
    assert index.lookup("myapp.localhost") is None
    assert index.lookup("idle.localhost").backends == (Backend("i1", "127.0.0.2", 4000),)


def test_host_claimed_twice_keeps_first_app() -> None:
    index = RouteIndex({"a": {"hosts": ["x.localhost"], "backends": []},
                        "b": {"hosts": ["x.localhost"], "backends": []}})
    assert index.lookup("x.localhost").app == "a"


def test_pages_html_and_json() -> None:
    html = pages.render(404, "No app at <x>", "check it", request_id="r1")
    head, body = html.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Length: %d" % len(body) in head and b"Connection: close" in head
    assert b"&lt;x&gt;" in body and b"check it" in body
    raw = pages.render(503, "down", "scale up", accept="application/json", keep_alive=True)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Connection: keep-alive" in head
    assert json.loads(body) == {"code": 503, "error": "Service Unavailable",
                                "message": "down", "hint": "scale up", "request_id": ""}
    assert not pages.wants_json("text/html,application/json")
    head_only = pages.render(404, "x", head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: " in head_only


def test_a_malformed_route_is_left_out_and_the_others_still_route():
    index = RouteIndex({"bad": {"hosts": ["bad.localhost"], "backends": [{"address": "x"}]},
                        "good": {"hosts": ["good.localhost"], "backends": []}})
    assert index.lookup("bad.localhost") is None
    assert index.lookup("good.localhost") is not None
