"""HTTP/1.1 message heads and framing decisions, without I/O (sans-IO).

Everything here takes bytes and returns values or raises BadRequest: where a head
ends, what it says, how long its body is, what to forward. The I/O layer
(proxy.py) only moves bytes according to these decisions, so the same rules can
later drive another engine.

Strictness (RFC 9112) is deliberate: a proxy that reads a message differently from
the backend behind it is how requests get smuggled, so anything ambiguous is a 400
and the connection is closed.

Trailers: chunked bodies are decoded and re-encoded in both directions; trailer
fields are checked for syntax and size, then dropped (never forwarded), so a trailer
can neither smuggle a header past the checks above nor change the framing.

Upgrade (WebSocket and any other protocol): a request with `Connection: upgrade`
and an Upgrade header keeps both on the way to the backend; a 101 answer keeps them
on the way back, and the engine then tunnels bytes both ways. Any other answer is an
ordinary response.
"""
from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass, field

from balancer.errors import BackendError, BadRequest

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")      # CTLs except HTAB
_TARGET = re.compile(r"[\x21-\x7e]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
_DIGITS = re.compile(r"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_.:+/=]{1,200}")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection",
})
# headers the balancer owns on the way to the backend
FORWARDED = frozenset({
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-request-id", "content-length", "host",
})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16384


@dataclass
class Framing:
    """How a body is delimited: none, length (with `length`), chunked, or close
    (responses only: the body runs until the backend closes)."""

    kind: str
    length: int = 0

    @property
    def has_body(self) -> bool:
        return self.kind != "none" and not (self.kind == "length" and self.length == 0)


NO_BODY = Framing("none")


@dataclass
class Headers:
    """Header fields in arrival order with case-insensitive lookup."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.items if k.lower() == name]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return values[0] if values else default

    def __contains__(self, name: str) -> bool:
        return bool(self.get_all(name))

    def tokens(self, name: str) -> list[str]:
        """Comma-separated list values of every `name` field, lowercased."""
        out = []
        for value in self.get_all(name):
            out.extend(p.strip().lower() for p in value.split(","))
        return [p for p in out if p]


@dataclass
class Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    host: str                  # Host header value as sent ("" when absent)
    framing: Framing
    keep_alive: bool
    expect_continue: bool = False
    upgrade: str = ""          # the Upgrade header when the client asks to switch

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


@dataclass
class Response:
    status: int
    reason: str
    version: tuple[int, int]
    headers: Headers
    framing: Framing
    keep_alive: bool           # may the backend connection be reused after it

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200


# -- finding the head -------------------------------------------------------------

def find_head(buf: bytes, max_bytes: int) -> tuple[int, int] | None:
    """Locate a complete head in `buf`: returns (start, end) where start skips the
    empty lines RFC 9112 allows before a request line and end is just past the
    blank line; None while incomplete. Raises 431 past `max_bytes`, 400 on a bare
    LF or CR (a line ending the backend might read differently)."""
    start = 0
    while buf.startswith(CRLF, start):
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    region = buf[start:end if end >= 0 else len(buf)]
    if region.count(b"\n") != region.count(b"\r\n") or \
            region.rstrip(b"\r").count(b"\r") != region.count(b"\r\n"):
        raise BadRequest("the request head has a bare LF or CR line ending",
                         "end every header line with CRLF")
    if end < 0:
        if len(buf) > max_bytes:
            raise BadRequest("the request head is too large",
                             f"keep headers under {max_bytes} bytes", status=431)
        return None
    end += 4
    if end - start > max_bytes:
        raise BadRequest("the request head is too large",
                         f"keep headers under {max_bytes} bytes", status=431)
    return start, end


# -- parsing ------------------------------------------------------------------------

def parse_fields(lines: list[bytes]) -> Headers:
    """Parse header lines strictly; raises BadRequest naming the fault."""
    headers = Headers()
    for raw in lines:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            raise BadRequest("obsolete line folding (a header line starting with "
                             "whitespace) is not accepted",
                             "send each header on a single line")
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"header line without a colon: {line[:60]!r}")
        if name != name.rstrip(" \t"):
            raise BadRequest(f"whitespace before the colon in header {name.strip()!r}",
                             "write `Name: value` with no space before the colon")
        if not _TOKEN.fullmatch(name):
            raise BadRequest(f"invalid header name {name[:60]!r}")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise BadRequest(f"invalid bytes in the value of header {name!r}")
        headers.items.append((name, value))
    return headers


def _version(text: str) -> tuple[int, int]:
    m = _VERSION.fullmatch(text)
    if not m:
        raise BadRequest(f"invalid HTTP version {text[:20]!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 1:
        raise BadRequest(f"HTTP version {text} is not supported", "use HTTP/1.1",
                         status=505)
    return 1, min(minor, 1)


def parse_request(head: bytes) -> Request:
    """Parse a complete request head (request line to blank line)."""
    lines = head.split(CRLF)
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3:
        raise BadRequest("the request line must be `METHOD target HTTP/1.1`")
    method, target, version_text = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"invalid method {method[:20]!r}")
    version = _version(version_text)
    headers = parse_fields(lines[1:])
    hosts = headers.get_all("host")
    if len(hosts) > 1:
        raise BadRequest("more than one Host header", "send exactly one Host header")
    if version >= (1, 1) and not hosts:
        raise BadRequest("HTTP/1.1 request without a Host header",
                         "send the site name in a Host header")
    host = hosts[0] if hosts else ""
    if not _TARGET.fullmatch(target):
        raise BadRequest("invalid request target")
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported by this proxy", status=501)
    if target.startswith("/"):
        pass
    elif target == "*":
        if method != "OPTIONS":
            raise BadRequest("the `*` target is only valid with OPTIONS")
    elif target.lower().startswith(("http://", "https://")):
        # absolute-form: the authority in the target wins over the Host header
        rest = target.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            raise BadRequest("user info in the request target is not accepted")
        host, target = authority, "/" + path if slash else "/"
    else:
        raise BadRequest("invalid request target",
                         "send a path starting with / (origin-form)")
    if not _HOST.fullmatch(host):
        raise BadRequest(f"invalid Host {host[:60]!r}")
    connection = headers.tokens("connection")
    if version >= (1, 1):
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection and "close" not in connection
    expect = [v.lower() for v in headers.get_all("expect")]
    framing = request_framing(headers, version)
    upgrade = ""
    if version >= (1, 1) and "upgrade" in connection and not framing.has_body:
        upgrade = ", ".join(headers.get_all("upgrade"))
    return Request(method, target, version, headers, host, framing, keep_alive,
                   expect_continue="100-continue" in expect, upgrade=upgrade)


def request_framing(headers: Headers, version: tuple[int, int]) -> Framing:
    """Decide the request body's framing, rejecting anything ambiguous."""
    for name, _ in headers.items:
        low = name.lower()
        if low in ("content_length", "transfer_encoding"):
            raise BadRequest(f"header {name!r} looks like a framing header",
                             "spell it with a hyphen")
    te = headers.get_all("transfer-encoding")
    cl = headers.get_all("content-length")
    if te:
        if cl:
            raise BadRequest("both Transfer-Encoding and Content-Length are present",
                             "send one of them")
        if version < (1, 1):
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [p.strip().lower() for v in te for p in v.split(",")]
        if codings != ["chunked"]:
            raise BadRequest(f"unsupported Transfer-Encoding {', '.join(te)!r}",
                             "send `Transfer-Encoding: chunked` alone")
        return Framing("chunked")
    if cl:
        length = content_length(cl)
        if length is None:
            raise BadRequest("invalid or conflicting Content-Length",
                             "send one Content-Length with a decimal byte count")
        return Framing("length", length) if length else NO_BODY
    return NO_BODY


def content_length(values: list[str]) -> int | None:
    """One length from every Content-Length value (identical repeats are allowed);
    None when any is invalid or they differ."""
    parts = [p.strip(" \t") for v in values for p in v.split(",")]
    if not parts or any(not _DIGITS.fullmatch(p) for p in parts):
        return None
    lengths = {int(p) for p in parts}
    return lengths.pop() if len(lengths) == 1 else None


def parse_response(head: bytes, method: str) -> Response:
    """Parse a backend's response head; faults are the backend's (502)."""
    try:
        lines = head.split(CRLF)
        while lines and lines[-1] == b"":
            lines.pop()
        status_line = lines[0].decode("latin-1") if lines else ""
        version_text, _, rest = status_line.partition(" ")
        version = _version(version_text)
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not code.isdigit():
            raise BadRequest(f"invalid status line {status_line[:60]!r}")
        headers = parse_fields(lines[1:])
    except BadRequest as exc:
        raise BackendError(f"the app sent an invalid response: {exc.message}",
                           "check the app's HTTP server") from exc
    status = int(code)
    framing = response_framing(method, status, headers)
    connection = headers.tokens("connection")
    if version >= (1, 1):
        keep = "close" not in connection
    else:
        keep = "keep-alive" in connection and "close" not in connection
    return Response(status, reason, version, headers, framing,
                    keep and framing.kind != "close")


def response_framing(method: str, status: int, headers: Headers) -> Framing:
    """RFC 9112 section 6.3, in order."""
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return NO_BODY
    te = headers.tokens("transfer-encoding")
    if te:
        return Framing("chunked") if te[-1] == "chunked" else Framing("close")
    cl = headers.get_all("content-length")
    if cl:
        length = content_length(cl)
        if length is None:
            raise BackendError("the app sent an invalid Content-Length",
                               "check the app's HTTP server")
        return Framing("length", length)
    return Framing("close")


# -- forwarding ---------------------------------------------------------------------

def hop_by_hop(headers: Headers) -> set[str]:
    """Lowercased names not to forward: the fixed set plus those Connection lists."""
    return set(HOP_BY_HOP) | set(headers.tokens("connection"))


def request_id(headers: Headers) -> str:
    """Keep a sane client X-Request-ID, otherwise make one."""
    given = headers.get("x-request-id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class TrustedProxies:
    """Client addresses whose X-Forwarded-* headers are believed (a list of
    addresses and CIDRs); everyone else's are replaced by what we saw."""

    def __init__(self, entries: list[str] | None = None) -> None:
        self.networks = [ipaddress.ip_network(e.strip(), strict=False)
                         for e in entries or [] if e.strip()]

    def __contains__(self, addr: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def forwarded_fields(req: Request, *, client_addr: str, port: int,
                     trusted: bool, proto: str = "http") -> list[tuple[str, str]]:
    """X-Forwarded-For/Proto/Host/Port for the backend. From an untrusted client
    every one is ours; from a trusted proxy For is appended to and the others are
    kept when it sent them."""
    h = req.headers
    chain = ", ".join(h.get_all("x-forwarded-for")) if trusted else ""

    def given(name: str) -> str | None:
        return h.get(name) if trusted and h.get(name) else None

    return [("X-Forwarded-For", f"{chain}, {client_addr}" if chain else client_addr),
            ("X-Forwarded-Proto", given("x-forwarded-proto") or proto),
            ("X-Forwarded-Host", given("x-forwarded-host") or req.host),
            ("X-Forwarded-Port", given("x-forwarded-port") or str(port))]


def body_too_large(req: Request, max_body: int | None) -> bool:
    """A Content-Length body above the app's limit (chunked bodies are counted
    as they stream, with BodyLimit)."""
    return bool(max_body) and req.framing.kind == "length" and \
        req.framing.length > int(max_body or 0)


class BodyLimit:
    """Counts a streamed body against an app's limit; `add` raises 413."""

    def __init__(self, max_body: int | None) -> None:
        self.max_body = int(max_body or 0)
        self.seen = 0

    def add(self, n: int) -> None:
        self.seen += n
        if self.max_body and self.seen > self.max_body:
            raise BadRequest("the request body is larger than this app accepts",
                             f"send at most {self.max_body} bytes", status=413)


def check_buffered_chunks(buf: bytes, max_body: int | None) -> None:
    """Before a backend is chosen: decode the chunked body bytes already received
    (a copy; the stream is not consumed) and raise 413 if they exceed the limit, or
    400 if they are malformed, so that such a request never reaches a backend.
    (Faults that arrive later in the stream cut it there: the backend then sees a
    truncated body, never the bytes past the fault.)"""
    if not buf:
        return
    limit = BodyLimit(max_body)
    for piece in ChunkedDecoder().feed(buf):
        limit.add(len(piece))


def backend_request_head(req: Request, *, client_addr: str, port: int,
                         req_id: str, trusted: bool = False) -> bytes:
    """The head sent to the backend: HTTP/1.1, hop-by-hop removed (except the
    Upgrade pair of an upgrade request), X-Forwarded-* set, the body re-framed as
    Content-Length or chunked."""
    drop = hop_by_hop(req.headers) | FORWARDED
    lines = [f"{req.method} {req.target} HTTP/1.1", f"Host: {req.host}"]
    lines += [f"{k}: {v}" for k, v in req.headers.items if k.lower() not in drop]
    lines += [f"{k}: {v}" for k, v in forwarded_fields(
        req, client_addr=client_addr, port=port, trusted=trusted)]
    lines.append(f"X-Request-ID: {req_id}")
    if req.upgrade:
        lines += ["Connection: Upgrade", f"Upgrade: {req.upgrade}"]
    if req.framing.kind == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif req.framing.kind == "length":
        lines.append(f"Content-Length: {req.framing.length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_response_head(resp: Response, *, framing_out: str, keep_alive: bool,
                         req_id: str) -> bytes:
    """The head sent to the client. framing_out is how we send the body: none,
    length, chunked or close."""
    drop = hop_by_hop(resp.headers)
    if framing_out in ("chunked", "close"):
        drop.add("content-length")   # HEAD/204/304 keep theirs: it describes the GET
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}".rstrip(" ")]
    lines += [f"{k}: {v}" for k, v in resp.headers.items if k.lower() not in drop]
    if "x-request-id" not in resp.headers and req_id:
        lines.append(f"X-Request-ID: {req_id}")
    if framing_out == "chunked":
        lines.append("Transfer-Encoding: chunked")
    if resp.status == 101:
        lines += ["Connection: Upgrade",
                  f"Upgrade: {', '.join(resp.headers.get_all('upgrade'))}"]
    elif not resp.interim:
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


# -- chunked bodies -----------------------------------------------------------------

class ChunkedDecoder:
    """Incremental chunked-body decoder. feed() returns the data bytes found so
    far; `done` turns true after the last chunk and trailers, and `leftover` then
    holds bytes past the body (a pipelined next request). Trailers are dropped.
    Raises BadRequest on bad chunk sizes or line endings."""

    def __init__(self) -> None:
        self.state = "size"
        self.remaining = 0
        self.buf = b""
        self.trailer_bytes = 0
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self.buf + data
        pos = 0
        while not self.done:
            if self.state == "data":
                take = min(self.remaining, len(buf) - pos)
                if take == 0:
                    break
                out.append(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "data_end"
                continue
            if self.state == "data_end":
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != CRLF:
                    raise BadRequest("chunk data is not followed by CRLF")
                pos += 2
                self.state = "size"
                continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_CHUNK_LINE:
                    raise BadRequest("chunk size line is too long")
                break
            if nl == pos or buf[nl - 1:nl] != b"\r":
                raise BadRequest("bare LF in chunked body")
            line = buf[pos:nl - 1]
            pos = nl + 1
            if self.state == "size":
                self._size(line)
            else:  # trailers
                self.trailer_bytes += len(line) + 2
                if self.trailer_bytes > MAX_TRAILERS:
                    raise BadRequest("chunked trailers are too large")
                if line == b"":
                    self.done = True
                elif b"\r" in line or line[:1] in (b" ", b"\t") or b":" not in line:
                    raise BadRequest("invalid trailer line in chunked body")
        if self.done:
            self.leftover, self.buf = buf[pos:], b""
        else:
            self.buf = buf[pos:]
        return out

    def _size(self, line: bytes) -> None:
        size, _, ext = line.partition(b";")
        if not _HEX.fullmatch(size):
            raise BadRequest(f"bad chunk size {size[:20]!r}",
                             "chunk sizes are hex digits followed by CRLF")
        if b"\r" in ext or _BAD_VALUE.search(ext.decode("latin-1")):
            raise BadRequest("invalid chunk extension")
        self.remaining = int(size, 16)
        self.state = "data" if self.remaining else "trailers"
