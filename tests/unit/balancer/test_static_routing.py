"""Which requests the balancer sends to a static file server (admission.static_target,
one decision for both engines), what it tells it, and that no client can say it."""
from __future__ import annotations

import random

import pytest

from balancer import admission, http1
from balancer.pool import Pool
from balancer.routes import RouteIndex
from messaging.shapes import Backend, Route

WEB = Backend("i1", "127.0.0.2", 5000)
STATIC = Backend("static@r1", "127.0.0.2", 7001)


def index(**static) -> RouteIndex:
    route = Route(("shop.localhost",), (WEB,), **static)
    return RouteIndex({"shop": route.to_wire()})


SERVED = {"static_prefix": "/static/", "static_backends": (STATIC,),
          "static_releases": (5, 4)}


def request(line: str, *headers: str, body: bytes = b"") -> http1.Request:
    raw = (f"{line}\r\nHost: shop.localhost\r\n" + "".join(h + "\r\n" for h in headers)
           + "\r\n").encode() + body
    start, end = http1.find_head(raw, 65536)
    return http1.parse_request(raw[start:end])


def target(req: http1.Request, idx: RouteIndex | None = None):
    match = (idx or index(**SERVED)).lookup(req.host)
    assert match is not None
    return admission.static_target(req, match)


def test_gets_and_heads_under_the_prefix_go_to_the_static_servers():
    for line in ("GET /static/admin/css/base.css HTTP/1.1",
                 "HEAD /static/a.js?v=1 HTTP/1.1", "GET /static/x HTTP/1.0"):
        got = target(request(line))
        assert got == admission.StaticTarget((STATIC,), "shop /static/ 5,4"), line


@pytest.mark.parametrize("req", [
    request("GET /admin/ HTTP/1.1"),
    request("GET /staticfoo.css HTTP/1.1"),
    request("GET /Static/a.css HTTP/1.1"),
    request("POST /static/a.css HTTP/1.1", "Content-Length: 1"),
    request("PUT /static/a.css HTTP/1.1", "Content-Length: 0"),
    request("OPTIONS /static/a.css HTTP/1.1"),
    request("GET /static/a.css HTTP/1.1", "Content-Length: 3"),
    request("GET /static/a.css HTTP/1.1", "Transfer-Encoding: chunked"),
    request("GET /static/ws HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket"),
])
def test_everything_else_goes_to_the_app(req):
    assert target(req) is None


def test_no_static_part_no_static_routing():
    assert target(request("GET /static/a.css HTTP/1.1"), index()) is None
    assert index().lookup("shop.localhost").static_header == ""


def test_match_is_built_once_per_table():
    idx = index(**SERVED)
    assert idx.lookup("shop.localhost") is idx.lookup("SHOP.localhost:80")


def test_clients_cannot_name_a_static_target():
    req = request("GET /static/a.css HTTP/1.1", "X-Berth-Static: other /static/ 1",
                  "x-berth-static: evil / 1")
    head = http1.backend_request_head(req, client_addr="1.2.3.4", port=80, req_id="r")
    assert b"berth-static" not in head.lower()
    head = http1.backend_request_head(req, client_addr="1.2.3.4", port=80, req_id="r",
                                      static="shop /static/ 5")
    assert head.lower().count(b"x-berth-static") == 1
    assert b"\r\nX-Berth-Static: shop /static/ 5\r\n" in head


def test_pool_tracks_static_backends_and_can_refuse_down_ones():
    pool = Pool(random.Random(1))
    assert pool.sync(RouteIndex({"shop": Route(("s",), (WEB,), **SERVED).to_wire()}).routes) == []
    assert set(pool.backends) == {WEB.key, STATIC.key}
    pool.mark_down(pool.backends[STATIC.key], 0.0)
    assert pool.choose((STATIC,), set(), 0.1, up_only=True) is None
    assert pool.choose((STATIC,), set(), 0.1) is pool.backends[STATIC.key]
