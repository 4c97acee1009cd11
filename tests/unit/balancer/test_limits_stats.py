"""Sans-IO decisions added for issue 3: forwarded headers and trusted proxies,
upgrade requests, body limits, maintenance pages, trailers, and the stats counters."""
from __future__ import annotations

import random

import pytest

from balancer import http1, pages
from balancer.errors import BadRequest
from balancer.routes import RouteIndex
from balancer.stats import Stats, percentile, status_class


def request(raw: bytes) -> http1.Request:
    start, end = http1.find_head(raw, 65536)
    return http1.parse_request(raw[start:end])


def head_fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [tuple(x.strip() for x in line.split(":", 1)) for line in lines if line]


SPOOF = (b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Forwarded-For: 6.6.6.6\r\n"
         b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\n\r\n")


def test_untrusted_client_forwarded_headers_are_replaced() -> None:
    fields = dict(head_fields(http1.backend_request_head(
        request(SPOOF), client_addr="10.0.0.9", port=8000, req_id="r1")))
    assert fields["X-Forwarded-For"] == "10.0.0.9"
    assert fields["X-Forwarded-Proto"] == "http"
    assert fields["X-Forwarded-Host"] == "app.localhost"
    assert fields["X-Forwarded-Port"] == "8000"
    names = [k.lower() for k, _ in head_fields(http1.backend_request_head(
        request(SPOOF), client_addr="10.0.0.9", port=8000, req_id="r1"))]
    assert names.count("x-forwarded-for") == 1


def test_trusted_proxy_appends_to_for_and_keeps_the_rest() -> None:
    trusted = http1.TrustedProxies(["10.0.0.0/8", "192.0.2.7"])
    assert "10.1.2.3" in trusted and "192.0.2.7" in trusted
    assert "192.0.2.8" not in trusted and "nonsense" not in trusted
    assert "10.0.0.1" not in http1.TrustedProxies([])
    fields = dict(head_fields(http1.backend_request_head(
        request(SPOOF), client_addr="10.0.0.9", port=8000, req_id="r1", trusted=True)))
    assert fields["X-Forwarded-For"] == "6.6.6.6, 10.0.0.9"
    assert fields["X-Forwarded-Proto"] == "https"
    assert fields["X-Forwarded-Host"] == "evil"
    assert fields["X-Forwarded-Port"] == "1"


def test_request_id_kept_when_sane_else_generated() -> None:
    req = request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc-123\r\n\r\n")
    assert http1.request_id(req.headers) == "abc-123"
    req = request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: a b;<script>\r\n\r\n")
    rid = http1.request_id(req.headers)
    assert rid != "a b;<script>" and len(rid) == 32


def test_upgrade_request_keeps_its_upgrade_pair() -> None:
    req = request(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                  b"Upgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n")
    assert req.upgrade == "websocket"
    fields = head_fields(http1.backend_request_head(req, client_addr="1.2.3.4",
                                                    port=1, req_id="r"))
    assert ("Connection", "Upgrade") in fields and ("Upgrade", "websocket") in fields
    assert ("Sec-WebSocket-Key", "x") in fields
    # without Connection: upgrade the Upgrade header is hop-by-hop and dropped
    plain = request(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert plain.upgrade == ""
    names = [k.lower() for k, _ in head_fields(http1.backend_request_head(
        plain, client_addr="1.2.3.4", port=1, req_id="r"))]
    assert "upgrade" not in names and "connection" not in names
    # HTTP/1.0 cannot upgrade
    assert request(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"
                   ).upgrade == ""


def test_101_response_head_keeps_upgrade() -> None:
    resp = http1.parse_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
                                b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: k\r\n\r\n",
                                "GET")
    head = http1.client_response_head(resp, framing_out="none", keep_alive=True,
                                      req_id="r")
    fields = head_fields(head)
    assert ("Connection", "Upgrade") in fields and ("Upgrade", "websocket") in fields
    assert ("Sec-WebSocket-Accept", "k") in fields
    assert [k for k, _ in fields].count("Connection") == 1


def test_early_hints_head_is_interim() -> None:
    resp = http1.parse_response(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload"
                                b"\r\n\r\n", "GET")
    assert resp.interim and resp.framing.kind == "none"
    head = http1.client_response_head(resp, framing_out="none", keep_alive=True,
                                      req_id="")
    assert head == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


def test_body_limits() -> None:
    req = request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert http1.body_too_large(req, 10) and not http1.body_too_large(req, 11)
    assert not http1.body_too_large(req, 0) and not http1.body_too_large(req, None)
    limit = http1.BodyLimit(10)
    limit.add(6)
    limit.add(4)
    with pytest.raises(BadRequest) as info:
        limit.add(1)
    assert info.value.status == 413
    http1.BodyLimit(0).add(1 << 40)


def test_trailers_are_dropped_and_cannot_smuggle() -> None:
    dec = http1.ChunkedDecoder()
    data = dec.feed(b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nContent-Length: 99\r\n\r\nNEXT")
    assert b"".join(data) == b"abc" and dec.done and dec.leftover == b"NEXT"
    for bad in (b"0\r\nX: 1\r\n folded\r\n\r\n", b"0\r\nno-colon\r\n\r\n",
                b"0\r\nX: 1\n\r\n"):
        with pytest.raises(BadRequest):
            http1.ChunkedDecoder().feed(bad)


def test_route_index_reads_maintenance_and_max_body() -> None:
    index = RouteIndex({"a": {"hosts": ["a.localhost"], "backends": [],
                              "maintenance": True, "max_body": 1024},
                        "b": {"hosts": ["b.localhost"], "backends": [],
                              "max_body": "junk"}})
    a, b = index.lookup("a.localhost"), index.lookup("b.localhost")
    assert a.maintenance and a.max_body == 1024
    assert not b.maintenance and b.max_body == 0


def test_maintenance_page_has_retry_after_and_says_why() -> None:
    raw = pages.maintenance("shop", 60, accept="application/json", request_id="r")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 60" in head
    assert b"maintenance" in body and b"shop" in body
    assert pages.render(413, "too big").startswith(b"HTTP/1.1 413 Content Too Large")


def test_status_classes_and_percentiles() -> None:
    assert [status_class(s) for s in (101, 204, 302, 404, 503, 999)] == \
        ["1xx", "2xx", "3xx", "4xx", "5xx", "5xx"]
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99 and percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.99) == 7.0


def test_stats_count_per_app_and_reset_each_interval() -> None:
    stats = Stats(random.Random(1), reservoir=50)
    stats.connection_opened()
    app = stats.attach(None, "shop")
    for i in range(200):
        stats.record("shop", 200 if i % 4 else 503, 100, 1000, float(i % 100))
    stats.record(None, 404, 50, 60, 1.0)
    apps, totals = stats.collect()
    shop = apps["shop"]
    assert shop["requests"] == 200 and shop["status"]["2xx"] == 150
    assert shop["status"]["5xx"] == 50 and shop["bytes_in"] == 20000
    assert shop["bytes_out"] == 200000 and shop["open"] == 1
    assert 0 < shop["p50_ms"] <= shop["p95_ms"] <= shop["p99_ms"] <= 99
    assert apps["-"]["status"]["4xx"] == 1
    assert totals == {"requests": 201, "connections": 1}
    # the next interval starts empty; the open connection is still counted
    apps, _ = stats.collect()
    assert apps["shop"]["requests"] == 0 and apps["shop"]["open"] == 1
    assert "-" not in apps
    stats.attach(app, "blog")
    stats.connection_closed("blog")
    apps, totals = stats.collect()
    assert apps == {} and totals["connections"] == 0


def test_buffered_chunks_are_checked_before_a_backend_is_chosen() -> None:
    http1.check_buffered_chunks(b"5\r\nhello\r\n", 5)
    http1.check_buffered_chunks(b"ff\r\nabc", 0)
    with pytest.raises(BadRequest) as info:
        http1.check_buffered_chunks(b"6\r\nhello!\r\n0\r\n\r\n", 5)
    assert info.value.status == 413
    with pytest.raises(BadRequest) as info:
        http1.check_buffered_chunks(b"zz\r\n", 5)
    assert info.value.status == 400


def test_route_index_knows_whether_a_table_arrived() -> None:
    index = RouteIndex()
    assert not index.loaded
    index.update({})
    assert index.loaded and RouteIndex({}).loaded


def test_hold_for_body_only_small_incomplete_length_bodies():
    from balancer import http1
    def resp(head: bytes) -> http1.Response:
        return http1.parse_response(head, "GET")
    small = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert http1.hold_for_body(small, 7) and not http1.hold_for_body(small, 100)
    big = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
    assert not http1.hold_for_body(big, 0)
    chunked = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert not http1.hold_for_body(chunked, 0)
