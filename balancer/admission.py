"""Whether a request may go to a backend, decided without I/O, once for every engine.

The order matters and is the same everywhere: no route table yet, unknown host,
maintenance, a declared body over the app's limit, chunked bytes already received
that are malformed (a smuggling attempt must never reach a backend), no running
instance. Each refusal is a whole response page the engine only has to send.
"""
from __future__ import annotations

from dataclasses import dataclass

from balancer import http1, pages
from balancer.errors import BadRequest
from balancer.routes import Match
from messaging.shapes import Backend


@dataclass
class Refusal:
    status: int
    keep_alive: bool
    page: bytes
    reason: str           # for the access log: no_routes, unknown_host, ...


def admit(req: http1.Request, match: Match | None, *, routes_loaded: bool,
          buffered: bytes, can_keep: bool, request_id: str,
          retry_after: int = 60) -> Refusal | None:
    """None when the request may be forwarded; else the answer to give instead.

    `can_keep`: the client connection may stay open after an answer of our own
    (false when a request body would be left unread). `buffered`: body bytes already
    read past the head."""
    accept = req.headers.get("accept")
    head_only = req.method == "HEAD"

    def page(status: int, message: str, hint: str, keep: bool, reason: str) -> Refusal:
        return Refusal(status, keep, pages.render(
            status, message, hint, accept=accept, request_id=request_id,
            keep_alive=keep, head_only=head_only), reason)

    if match is None and not routes_loaded:
        return page(503, "This balancer has not received its route table yet.",
                    "It is starting or cannot reach the controller; retry in a moment.",
                    can_keep, "no_routes")
    if match is None:
        return page(404, f"No app is served at the host {req.host!r}.",
                    "Check the address for typos. If this is your app, add this host "
                    "name to its domains and wait a few seconds for the route to spread.",
                    can_keep, "unknown_host")
    if match.maintenance:
        return Refusal(503, can_keep, pages.maintenance(
            match.app, retry_after, accept=accept, request_id=request_id,
            keep_alive=can_keep, head_only=head_only), "maintenance")
    if http1.body_too_large(req, match.max_body):
        return page(413, f"The request body ({req.framing.length} bytes) is larger than "
                    f"the app {match.app!r} accepts.",
                    f"Send at most {match.max_body} bytes; the app's owner sets this "
                    "limit.", False, "too_large")
    if req.framing.kind == "chunked":
        try:
            http1.check_buffered_chunks(buffered, match.max_body)
        except BadRequest as exc:
            return page(exc.status, exc.message, exc.hint, False, "bad_chunks")
    if not match.backends:
        return page(503, f"The app {match.app!r} has no running instance.",
                    match.reason or "Start a web process for the app and retry.",
                    can_keep, "no_backends")
    return None


@dataclass(frozen=True)
class StaticTarget:
    """Where an admitted request for the app's static files goes instead of an
    instance: one of the hosts' static file servers, told by `header` (sent as
    X-Berth-Static, which the balancer removes from every client request) which app,
    URL prefix and release versions it is for."""
    backends: tuple[Backend, ...]
    header: str


def static_target(req: http1.Request, match: Match) -> StaticTarget | None:
    """Whether the platform serves this request from the app's collected static
    files: a GET or HEAD, with no body and no protocol upgrade, whose path is under
    the route's static prefix. Decided once here for both engines; when every static
    server fails, the engine sends the request to the app's instances instead."""
    if not match.static_backends or req.method not in ("GET", "HEAD") \
            or req.framing.has_body or req.upgrade \
            or not req.target.startswith(match.static_prefix):
        return None
    return StaticTarget(match.static_backends, match.static_header)
