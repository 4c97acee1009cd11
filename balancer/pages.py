"""Error pages the balancer itself answers with: HTML for browsers, JSON for
clients that ask for it. Each says what happened and what to do."""
from __future__ import annotations

import html
import json

REASONS = {
    400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def wants_json(accept: str | None) -> bool:
    """JSON when the client lists application/json (or +json) before any HTML."""
    if not accept:
        return False
    for part in accept.lower().split(","):
        kind = part.split(";")[0].strip()
        if kind in ("text/html", "application/xhtml+xml"):
            return False
        if kind == "application/json" or kind.endswith("+json"):
            return True
    return False


def render(status: int, message: str, hint: str = "", *, accept: str | None = None,
           request_id: str = "", keep_alive: bool = False,
           head_only: bool = False,
           headers: list[tuple[str, str]] | None = None) -> bytes:
    """A complete response (head and body) for an error the balancer answers."""
    reason = REASONS.get(status, "Error")
    if wants_json(accept):
        body = json.dumps({"code": status, "error": reason, "message": message,
                           "hint": hint, "request_id": request_id}).encode() + b"\n"
        ctype = "application/json"
    else:
        body = (
            "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{status} {reason}</title></head>\n<body>\n"
            f"<h1>{status} {reason}</h1>\n<p>{html.escape(message)}</p>\n"
            + (f"<p><strong>What to do:</strong> {html.escape(hint)}</p>\n" if hint else "")
            + f"<p><small>request id {html.escape(request_id)} &middot; berth balancer"
            "</small></p>\n</body></html>\n").encode()
        ctype = "text/html; charset=utf-8"
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            + (f"X-Request-ID: {request_id}\r\n" if request_id else "")
            + "".join(f"{k}: {v}\r\n" for k, v in headers or [])
            + f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


def maintenance(app: str, retry_after: int, *, accept: str | None = None,
                request_id: str = "", keep_alive: bool = False,
                head_only: bool = False) -> bytes:
    """503 for an app its owner put in maintenance mode, with Retry-After."""
    return render(503, f"The app {app!r} is down for maintenance.",
                  f"Its owner switched maintenance mode on; retry in {retry_after} "
                  "seconds.", accept=accept, request_id=request_id,
                  keep_alive=keep_alive, head_only=head_only,
                  headers=[("Retry-After", str(retry_after))])
