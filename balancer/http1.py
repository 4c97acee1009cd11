"""HTTP/1.1 message heads and framing decisions, without I/O (sans-IO).

Everything here takes bytes and returns values or raises BadRequest: where a head
ends, what it says, how long its body is, what to forward. The exchange
(exchange.py, on either engine) only moves bytes according to these decisions.

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
import itertools
import os
import re
from dataclasses import dataclass
from typing import Final

from balancer.errors import BackendError, BadRequest

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")      # CTLs except HTAB
_TARGET: Final = re.compile(r"[\x21-\x7e]+")
_VERSION: Final = re.compile(r"HTTP/([0-9])\.([0-9])")
_HOST: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
_DIGITS: Final = re.compile(r"[0-9]{1,18}")
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,15}")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9\-_.:+/=]{1,200}")

# The fast path: one regex pass splits a header block into (name, raw value) pairs
# where every name is a token and every value holds only HTAB, SP, VCHAR and
# obs-text; the block is valid when those matches cover it exactly (their lengths
# add up to its length). Anything else goes through the line-by-line parser below,
# which either raises the precise BadRequest or returns the same result: the fast
# path accepts a subset of what the slow path accepts, never more.
_TCHARS = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_VCHARS = r"\x21-\x7e\x80-\xff"
_FIELD: Final = re.compile(rf"([{_TCHARS}]+):([\t\x20{_VCHARS}]*)\r\n")
_REQUEST_LINE: Final = re.compile(rf"([{_TCHARS}]+) ([\x21-\x7e]+) HTTP/1\.([0-9])\r\n")
_STATUS_LINE: Final = re.compile(rf"HTTP/1\.([0-9]) ([0-9]{{3}})(?: ([\t\x20{_VCHARS}]*))?\r\n")

# Generated request ids: a random per-process prefix and a counter, 32 hex digits
# like a uuid4 and a fraction of its cost; the prefix is redrawn after fork.
_RID_PREFIX = os.urandom(8).hex()
_RID_COUNTER: Final = itertools.count(1)


def _reseed_request_ids() -> None:
    global _RID_PREFIX
    _RID_PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_reseed_request_ids)

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection",
})
# headers the balancer owns on the way to the backend (X-Berth-Static: which app and
# release a static file server serves; never a client's word)
FORWARDED: Final = frozenset({
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-request-id", "content-length", "host", "x-berth-static",
})
_DROP_TO_BACKEND: Final = HOP_BY_HOP | FORWARDED
_DROP_TO_CLIENT_REFRAMED: Final = HOP_BY_HOP | {"content-length"}
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MAX_CHUNK_LINE: Final = 4096
MAX_TRAILERS: Final = 16384


# The message classes are dataclasses for their __eq__ and __repr__, with their own
# __init__ (init=False): mypyc compiles that one, where the generated one would run
# interpreted on every request.
@dataclass(init=False)
class Framing:
    """How a body is delimited: none, length (with `length`), chunked, or close
    (responses only: the body runs until the backend closes)."""

    kind: str
    length: int

    def __init__(self, kind: str, length: int = 0) -> None:
        self.kind = kind
        self.length = length

    @property
    def has_body(self) -> bool:
        return self.kind != "none" and not (self.kind == "length" and self.length == 0)


NO_BODY: Final = Framing("none")


class Headers:
    """Header fields in arrival order (`items`, for forwarding) with a
    lowercase-name -> values index built once (`index`, for lookups)."""

    __slots__ = ("items", "index", "_connection", "block", "cuts")

    def __init__(self, items: list[tuple[str, str]] | None = None,
                 index: dict[str, list[str]] | None = None, block: str = "",
                 cuts: list[tuple[int, int, str]] | None = None) -> None:
        self.items = items if items is not None else []
        # from the fast path: the header block as received, and where its lines
        # that a head we send may drop are (start, end, lowercase name); the
        # head builders then forward the rest of the block in a few slices
        self.block = block
        self.cuts = cuts
        if index is None:
            index = {}
            for name, value in self.items:
                low = name.lower()
                values = index.get(low)
                if values is None:
                    index[low] = [value]
                else:
                    values.append(value)
        self.index = index
        self._connection: list[str] | None = None

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self.items == other.items

    def get_all(self, name: str) -> list[str]:
        return list(self.index.get(name.lower(), ()))

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.index.get(name.lower())
        return values[0] if values else default

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.index

    def tokens(self, name: str) -> list[str]:
        """Comma-separated list values of every `name` field, lowercased."""
        return _tokens(self.index.get(name.lower()))

    @property
    def connection(self) -> list[str]:
        """The Connection tokens, computed once."""
        if self._connection is None:
            self._connection = _tokens(self.index.get("connection"))
        return self._connection


def _tokens(values: list[str] | None) -> list[str]:
    if not values:
        return []
    if len(values) == 1 and "," not in values[0]:
        token = values[0].strip().lower()
        return [token] if token else []
    out: list[str] = []
    for value in values:
        out.extend(p.strip().lower() for p in value.split(","))
    return [p for p in out if p]


@dataclass(init=False)
class Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    host: str                  # Host header value as sent ("" when absent)
    framing: Framing
    keep_alive: bool
    expect_continue: bool
    upgrade: str               # the Upgrade header when the client asks to switch

    def __init__(self, method: str, target: str, version: tuple[int, int],
                 headers: Headers, host: str, framing: Framing, keep_alive: bool,
                 expect_continue: bool = False, upgrade: str = "") -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.framing = framing
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT


@dataclass(init=False)
class Response:
    status: int
    reason: str
    version: tuple[int, int]
    headers: Headers
    framing: Framing
    keep_alive: bool           # may the backend connection be reused after it

    def __init__(self, status: int, reason: str, version: tuple[int, int],
                 headers: Headers, framing: Framing, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200


# -- finding the head -------------------------------------------------------------

def find_head(buf: bytes, max_bytes: int) -> tuple[int, int] | None:
    """Locate a complete head in `buf`: returns (start, end) where start skips the
    empty lines RFC 9112 allows before a request line and end is just past the
    blank line; None while incomplete. Raises 431 past `max_bytes`, 400 on a bare
    LF or CR (a line ending the backend might read differently): here for a head
    still incomplete or too large, and for a complete one when it is parsed (the
    fast path accepts only CRLF-ended lines with no other CR or LF; the line-by-
    line parsers call check_line_endings first), so a head that arrived whole is
    not counted through three more times."""
    size = len(buf)
    if not size:
        return None     # a new connection's first look, before any byte: nothing to count
    start = 0
    while start + 1 < size and buf[start] == 13 and buf[start + 1] == 10:   # CRLF
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0 and end + 4 - start <= max_bytes:
        return start, end + 4
    check_line_endings(buf, start, end if end >= 0 else size)
    if end < 0 and size <= max_bytes:
        return None
    raise BadRequest("the request head is too large",
                     f"keep headers under {max_bytes} bytes", status=431)


def check_line_endings(buf: bytes, start: int, stop: int) -> None:
    """400 unless every LF and every CR in buf[start:stop], less CRs at its very
    end (a CRLF still arriving), belongs to a CRLF (counted in place, no copy)."""
    crlf = buf.count(b"\r\n", start, stop)
    trailing = stop
    while trailing > start and buf[trailing - 1] == 13:
        trailing -= 1
    if buf.count(b"\n", start, stop) != crlf or buf.count(b"\r", start, trailing) != crlf:
        raise BadRequest("a line of the head ends in a bare LF or CR",
                         "end every line of the head with CRLF")


# -- parsing ------------------------------------------------------------------------

def parse_fields(lines: list[bytes]) -> Headers:
    """Parse header lines strictly, one at a time; raises BadRequest naming the
    fault. (The slow path: heads the whole-block regexes do not accept.)"""
    items = []
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
        items.append((name, value))
    return Headers(items)


def _fast_fields(block: str) -> Headers | None:
    """Headers from a block of `Name: value\\r\\n` lines in one regex pass and one
    loop (which also builds the index); None unless every line is plainly valid."""
    items = []
    index: dict[str, list[str]] = {}
    cuts: list[tuple[int, int, str]] = []
    covered = 0
    pairs: list[tuple[str, str]] = _FIELD.findall(block)   # typed: native str calls
    for name, raw in pairs:
        start = covered
        covered += len(name) + len(raw) + 3
        value = raw.strip(" \t")
        items.append((name, value))
        low = name.lower()
        if low in _DROP_TO_BACKEND:       # every name a head we send may drop
            cuts.append((start, covered, low))
        values = index.get(low)
        if values is None:
            index[low] = [value]
        else:
            values.append(value)
    if covered != len(block):
        return None
    return Headers(items, index, block, cuts)


def _version(text: str) -> tuple[int, int]:
    m = _VERSION.fullmatch(text)
    if not m:
        raise BadRequest(f"invalid HTTP version {text[:20]!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 1:
        raise BadRequest(f"HTTP version {text} is not supported", "use HTTP/1.1",
                         status=505)
    return 1, min(minor, 1)


def _head_lines(head: bytes) -> list[bytes]:
    """The lines of a complete head, for the line-by-line parsers; 400 on a bare
    LF or CR (find_head leaves that check to the parsers for a complete head)."""
    check_line_endings(head, 0, len(head))
    lines = head.split(CRLF)
    while lines and lines[-1] == b"":
        lines.pop()
    return lines


def parse_request(head: bytes) -> Request:
    """Parse a complete request head (request line to blank line)."""
    text = head.decode("latin-1")
    m = _REQUEST_LINE.match(text)
    headers = None
    if m is not None and text.endswith("\r\n\r\n"):
        headers = _fast_fields(text[m.end():-2])
    if m is None or headers is None:
        return _parse_request_lines(head)
    method: str
    target: str
    minor: str
    method, target, minor = m.groups()
    return _request(method, target, (1, 0) if minor == "0" else (1, 1), headers)


def _parse_request_lines(head: bytes) -> Request:
    """The line-by-line parser: precise errors for every fault."""
    lines = _head_lines(head)
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
    if not _TARGET.fullmatch(target):
        # checked after the Host rules in _request on the fast path; same answer
        _check_hosts(headers, version)
        raise BadRequest("invalid request target")
    return _request(method, target, version, headers)


def _check_hosts(headers: Headers, version: tuple[int, int]) -> str:
    hosts = headers.index.get("host")
    if hosts is not None and len(hosts) > 1:
        raise BadRequest("more than one Host header", "send exactly one Host header")
    if version >= (1, 1) and not hosts:
        raise BadRequest("HTTP/1.1 request without a Host header",
                         "send the site name in a Host header")
    return hosts[0] if hosts else ""


def _request(method: str, target: str, version: tuple[int, int],
             headers: Headers) -> Request:
    """The rules past syntax, for a lexically valid request."""
    host = _check_hosts(headers, version)
    if method == "CONNECT":
        raise BadRequest("CONNECT is not supported by this proxy", status=501)
    if target[0] == "/":
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
    connection = headers.connection
    if version >= (1, 1):
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection and "close" not in connection
    index = headers.index
    expect = index.get("expect")
    framing = request_framing(headers, version)
    upgrade = ""
    if version >= (1, 1) and "upgrade" in connection and not framing.has_body:
        upgrade = ", ".join(index.get("upgrade", ()))
    return Request(method, target, version, headers, host, framing, keep_alive,
                   expect_continue=bool(expect) and
                   "100-continue" in [v.lower() for v in expect or ()],
                   upgrade=upgrade)


def request_framing(headers: Headers, version: tuple[int, int]) -> Framing:
    """Decide the request body's framing, rejecting anything ambiguous."""
    index = headers.index
    for low in ("content_length", "transfer_encoding"):
        if low in index:
            name = next(k for k, _ in headers.items if k.lower() == low)
            raise BadRequest(f"header {name!r} looks like a framing header",
                             "spell it with a hyphen")
    te = index.get("transfer-encoding")
    cl = index.get("content-length")
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
    if len(values) == 1:
        value = values[0].strip(" \t")
        if value.isascii() and value.isdigit() and len(value) <= 18:
            return int(value)
    parts = [p.strip(" \t") for v in values for p in v.split(",")]
    if not parts or any(not _DIGITS.fullmatch(p) for p in parts):
        return None
    lengths = {int(p) for p in parts}
    return lengths.pop() if len(lengths) == 1 else None


def parse_response(head: bytes, method: str) -> Response:
    """Parse a backend's response head; faults are the backend's (502)."""
    text = head.decode("latin-1")
    m = _STATUS_LINE.match(text)
    headers = None
    if m is not None and text.endswith("\r\n\r\n"):
        headers = _fast_fields(text[m.end():-2])
    if m is not None and headers is not None:
        code: str
        reason_given: str | None
        minor, code, reason_given = m.groups()
        version = (1, 0) if minor == "0" else (1, 1)      # HTTP/1.0, else 1.1
        status, reason = int(code), reason_given or ""
    else:
        status, reason, version, headers = _parse_response_lines(head)
    framing = response_framing(method, status, headers)
    connection = headers.connection
    if version >= (1, 1):
        keep = "close" not in connection
    else:
        keep = "keep-alive" in connection and "close" not in connection
    return Response(status, reason, version, headers, framing,
                    keep and framing.kind != "close")


def _parse_response_lines(head: bytes) -> tuple[int, str, tuple[int, int], Headers]:
    """The line-by-line parser for responses the fast path did not accept."""
    try:
        lines = _head_lines(head)
        status_line = lines[0].decode("latin-1") if lines else ""
        version_text, _, rest = status_line.partition(" ")
        version = _version(version_text)
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not (code.isascii() and code.isdigit()):
            raise BadRequest(f"invalid status line {status_line[:60]!r}")
        headers = parse_fields(lines[1:])
    except BadRequest as exc:
        raise BackendError(f"the app sent an invalid response: {exc.message}",
                           "check the app's HTTP server") from exc
    return int(code), reason, version, headers


def response_framing(method: str, status: int, headers: Headers) -> Framing:
    """RFC 9112 section 6.3, in order."""
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return NO_BODY
    index = headers.index
    if "transfer-encoding" in index:
        te = _tokens(index["transfer-encoding"])
        if te:
            return Framing("chunked") if te[-1] == "chunked" else Framing("close")
    cl = index.get("content-length")
    if cl:
        length = content_length(cl)
        if length is None:
            raise BackendError("the app sent an invalid Content-Length",
                               "check the app's HTTP server")
        return Framing("length", length)
    return Framing("close")


# -- forwarding ---------------------------------------------------------------------

HOLD_LIMIT: Final = 65536   # small bodies of retryable requests are held whole before sending


def hold_for_body(resp: Response, have: int) -> bool:
    """Whether to read a small Content-Length body whole before the client sees any
    of the response: for an idempotent request, a backend that dies between its
    head and its body (gunicorn writes them apart) is then retried on another
    instance instead of giving the client a short body."""
    return resp.framing.kind == "length" and have < resp.framing.length <= HOLD_LIMIT


def hop_by_hop(headers: Headers) -> frozenset[str]:
    """Lowercased names not to forward: the fixed set plus those Connection lists."""
    connection = headers.connection
    return HOP_BY_HOP.union(connection) if connection else HOP_BY_HOP


def _drop(base: frozenset[str], connection: list[str]) -> frozenset[str]:
    """`base` plus the names Connection lists (no new set in the common case, where
    it lists only keep-alive or close, both in HOP_BY_HOP already)."""
    for token in connection:
        if token not in base:
            return base.union(connection)
    return base


def _kept_fields(headers: Headers, drop: frozenset[str], parts: list[str],
                 sliced: bool) -> None:
    """Append the header lines not in `drop`: slices of the block as received
    when there is one and `drop` holds no name past _DROP_TO_BACKEND (`sliced`:
    no Connection token named another header), else one line per item."""
    cuts = headers.cuts
    if sliced and cuts is not None:
        block = headers.block
        pos = 0
        for start, end, low in cuts:
            if low in drop:
                if start > pos:
                    parts.append(block[pos:start])
                pos = end
        if pos < len(block):
            parts.append(block[pos:])
        return
    parts += [f"{k}: {v}\r\n" for k, v in headers.items if k.lower() not in drop]


def request_id(headers: Headers) -> str:
    """Keep a sane client X-Request-ID, otherwise make one."""
    given = headers.index.get("x-request-id")
    if given and _REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return _RID_PREFIX + format(next(_RID_COUNTER), "016x")


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
                         req_id: str, trusted: bool = False,
                         static: str | None = None) -> bytes:
    """The head sent to the backend: HTTP/1.1, hop-by-hop removed (except the
    Upgrade pair of an upgrade request), X-Forwarded-* set, the body re-framed as
    Content-Length or chunked; `X-Berth-Static: <static>` for a static file server
    (admission.static_target)."""
    drop = _drop(_DROP_TO_BACKEND, req.headers.connection)
    parts = [f"{req.method} {req.target} HTTP/1.1\r\nHost: {req.host}\r\n"]
    _kept_fields(req.headers, drop, parts, drop is _DROP_TO_BACKEND)
    if trusted:
        parts += [f"{k}: {v}\r\n" for k, v in forwarded_fields(
            req, client_addr=client_addr, port=port, trusted=trusted)]
    else:
        parts.append(f"X-Forwarded-For: {client_addr}\r\nX-Forwarded-Proto: http\r\n"
                     f"X-Forwarded-Host: {req.host}\r\nX-Forwarded-Port: {port}\r\n")
    parts.append(f"X-Request-ID: {req_id}\r\n")
    if static is not None:
        parts.append(f"X-Berth-Static: {static}\r\n")
    if req.upgrade:
        parts.append(f"Connection: Upgrade\r\nUpgrade: {req.upgrade}\r\n")
    kind = req.framing.kind
    if kind == "chunked":
        parts.append("Transfer-Encoding: chunked\r\n")
    elif kind == "length":
        parts.append(f"Content-Length: {req.framing.length}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def client_response_head(resp: Response, *, framing_out: str, keep_alive: bool,
                         req_id: str) -> bytes:
    """The head sent to the client. framing_out is how we send the body: none,
    length, chunked or close."""
    # HEAD/204/304 keep their Content-Length: it describes the GET
    base = _DROP_TO_CLIENT_REFRAMED if framing_out in ("chunked", "close") else HOP_BY_HOP
    drop = _drop(base, resp.headers.connection)
    line = f"HTTP/1.1 {resp.status} {resp.reason}".rstrip(" ")
    parts = [f"{line}\r\n"]
    _kept_fields(resp.headers, drop, parts, drop is base)
    if req_id and "x-request-id" not in resp.headers.index:
        parts.append(f"X-Request-ID: {req_id}\r\n")
    if framing_out == "chunked":
        parts.append("Transfer-Encoding: chunked\r\n")
    if resp.status == 101:
        upgrade = ", ".join(resp.headers.index.get("upgrade", ()))
        parts.append(f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n")
    elif not resp.interim:
        parts.append("Connection: keep-alive\r\n\r\n" if keep_alive
                     else "Connection: close\r\n\r\n")
        return "".join(parts).encode("latin-1")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


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
