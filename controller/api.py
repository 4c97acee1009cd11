"""The HTTP JSON API the CLI speaks (and runners fetch slugs from).

`http.server` handlers served by controller/httpserver.py, which bounds what
clients may hold (header and body deadlines, a worker pool, a cap on long-lived
streams, size limits) and answers malformed heads itself. Every error is
`{"error": {"code", "message", "hint"}}` with a fitting status, malformed input a
4xx saying what was wrong. Bearer tokens: user tokens from the store; the runner
token only for slugs.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import select
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from controller import addons as addon_rules
from controller import attach, slugcheck
from controller.addons import Addon, AddonState
from controller.backups import BACKUP_ADMIN, Catalog
from controller.errors import Forbidden, Invalid, NotFound, Unauthorized, internal
from controller.httpserver import BoundedHandler, BoundedHTTPServer, ServerLimits
from controller.logstore import format_line
from controller.pauses import (
    PAUSE_SECONDS,
    ControllerSupervisor,
    forget_formation,
    remember_formation,
)
from controller.runs import Attachment
from controller.store import Release
from messaging import runframes
from messaging.errors import BerthError
from messaging.shapes import ROLES, role_at_least

if TYPE_CHECKING:
    from controller.daemon import Controller

log = logging.getLogger(__name__)

MAX_JSON = 1 << 20
APP_STOP_SECONDS = 60.0
SLUG_NAME = re.compile(r"^[0-9a-f]{64}$")
ROUTES: list[tuple[str, re.Pattern[str], str]] = []
# who may call each endpoint (by handler name), beyond a valid token:
#   "app"    a team token only for an app it has a role on (the first path part is
#            the app), and only with at least the endpoint's role (ROLES_NEEDED)
#   "build", "run", "addon"   the same, for the app the build, run or addon is of
#   "any"    every token (the handler shows a team token only the apps it has a role
#            on, and their things)
#   "admin"  admin tokens only: the platform's own views and tokens
# An endpoint that declares nothing is "admin": a new one is closed until opened; one
# that declares a scope but no role needs "owner" (docs/architecture.md, Roles).
SCOPES: dict[str, str] = {}
SCOPE_KINDS = ("app", "build", "run", "addon", "any", "admin")
ROLES_NEEDED: dict[str, str] = {}
DEFAULT_ROLE = "owner"


def route(method: str, pattern: str, scope: str = "admin", role: str = DEFAULT_ROLE
          ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    assert scope in SCOPE_KINDS, scope
    assert role in ROLES, role

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        ROUTES.append((method, re.compile(f"^{pattern}$"), fn.__name__))
        SCOPES[fn.__name__] = scope
        ROLES_NEEDED[fn.__name__] = role
        return fn
    return deco


# requests that last (a follow, an upload, a run's session): each gets a thread of
# its own (bounded by api_streams) instead of a pool worker. Slug downloads stay in
# the pool: runners are trusted and fast readers, and a runner starting 200 apps
# at once should queue for workers, not be refused beyond api_streams
LONG = (re.compile(r"^GET /v1/runs/[^/?]+/attach(\?|$)"),
        re.compile(r"^POST /v1/apps/[^/?]+/builds(\?|$)"),
        re.compile(r"^GET /v1/builds/[^/?]+/log(\?|$)"),
        re.compile(r"^GET /v1/[^?]*\?(.*&)?follow=(1|true)(&|$)"),
        re.compile(r"^POST /v1/backups/[^?]*(\?|$)"))


def is_long(method: str, target: str) -> bool:
    line = f"{method} {target}"
    return any(p.match(line) for p in LONG)


class Handler(BoundedHandler):
    server: ApiServer  # type: ignore[assignment]

    # -- plumbing -----------------------------------------------------------
    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("api %s", fmt % args)

    def _dispatch(self) -> None:
        self.url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(self.url.query).items()}
        try:
            for method, pattern, name in ROUTES:
                m = pattern.match(self.url.path)
                if m and method == self.command:
                    if name.startswith("platform_"):
                        self._platform_auth()
                    elif name.startswith("backup_"):
                        self._backup_auth()
                    elif name != "health":
                        self._auth(slug=name == "get_slug")
                        if name != "get_slug":
                            self._authorize(name, m.groups())
                    getattr(self, name)(*m.groups())
                    return
            if any(p.match(self.url.path) for _, p, _ in ROUTES):
                raise BerthError(f"method {self.command} is not allowed on {self.url.path}",
                                 "see docs/architecture.md for the API", code="method",
                                 status=405)
            raise NotFound(f"no API endpoint {self.url.path}",
                           "check that the CLI and the controller are the same version")
        except BerthError as exc:
            # a body left unread must not be taken for the next request: close
            unread = exc.status == 413 or self.headers.get("Content-Length", "0") != "0"
            self._json(exc.status, {"error": exc.to_dict()}, close=unread)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TimeoutError as exc:            # a client too slow to send or to read
            log.info("api request timed out", extra={"path": self.url.path,
                                                     "error": str(exc)})
            self._json(408, {"error": {"code": "timeout", "message": str(exc) or
                                       "the request timed out", "hint": "send the whole "
                                       "request without pauses"}}, close=True)
        except Exception as exc:               # keep the server up; tell the user
            log.exception("api error", extra={"path": self.url.path})
            self._json(500, {"error": internal(exc).to_dict()})

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """What http.server refuses itself (bad request line or version, too many
        headers), in the API's error shape."""
        if code == HTTPStatus.NOT_IMPLEMENTED:       # a method no endpoint has
            code, message = 405, f"method {self.command[:20]!r} is not allowed here"
            explain = "the API takes GET, POST, PATCH, PUT and DELETE"
        try:
            status = HTTPStatus(code)
            text = message or status.phrase
        except ValueError:
            text = message or "bad request"
        self.close_connection = True
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            self.request_version = "HTTP/1.1"       # so a status line is sent at all
        self._json(code, {"error": {"code": "bad_request", "message": text,
                                    "hint": explain or "send a well-formed HTTP/1.1 request"}},
                   close=True)

    def _int_query(self, name: str, default: int, low: int, high: int | None = None) -> int:
        """A whole-number query parameter, at least `low`; clamped to `high`."""
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise Invalid(f"query parameter {name}={raw[:40]!r} is not a whole number",
                          f"give {name} as digits, e.g. ?{name}={default}") from None
        if value < low:
            raise Invalid(f"query parameter {name}={value} is below {low}",
                          f"give {name} >= {low}")
        return value if high is None else min(value, high)

    team: str | None = None         # the token's team; None: an admin token

    def _authorize(self, name: str, groups: tuple[str, ...]) -> None:
        """403 unless the token may call endpoint `name` on what `groups` name."""
        if self.team is None:
            return
        scope = SCOPES.get(name, "admin")
        if scope == "any":
            return
        if scope == "admin":
            raise Forbidden("this endpoint is for the platform's admins",
                            f"your token is team {self.team}'s; ask an admin")
        app = self._app_of(scope, groups[0])
        if app is None:
            return
        need, have = ROLES_NEEDED[name], self.c.store.app_role(app, self.team)
        if not role_at_least(have, need):
            owner = self.c.store.app_team(app)
            has = f"{self.team} is {have}" if have else f"{self.team} has no role on it"
            who = f"the app's owner ({owner})" if owner else "an admin (the app is theirs)"
            raise Forbidden(f"needs {need} on app '{app}'; {has}",
                            f"ask {who}: `berth access add {self.team} --role {need} "
                            f"-a {app}`")

    def _app_of(self, scope: str, key: str) -> str | None:
        """The app an endpoint's path names, or None when nothing by that id exists
        (the endpoint answers 404 itself)."""
        if scope == "app":
            return key
        if scope == "build":
            return str(self.c.store.build(key)["app"])
        if scope == "addon":
            return self.c.store.addon(key).app
        run = self.c.run_loop.runs.lookup(key)
        return run.app if run is not None else None

    def _mine(self) -> dict[str, str] | None:
        """The token's role on each app it may see in a listing; None: an admin token,
        which sees every app."""
        return None if self.team is None else self.c.store.team_roles(self.team)

    def _auth(self, slug: bool = False) -> None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise Unauthorized("missing bearer token",
                               "log in with `berth login --token TOKEN` (the token is in "
                               "the data directory's admin.token)")
        token = header[7:].strip()
        if slug and hmac.compare_digest(token, self.server.controller.runner_token):
            return
        found = None if slug else self.server.controller.store.token_identity(token)
        if found is None:
            raise Unauthorized("the token is not recognized",
                               "log in again with `berth login --token TOKEN`")
        self.team = found[1]

    def _backup_auth(self) -> None:
        """Backups (restore replaces tenants' data): a token of the backup-admin role,
        the platform's token named backup-admin (no team's)."""
        self._auth()
        token = self.headers.get("Authorization", "")[7:].strip()
        if self.server.controller.store.token_identity(token) != (BACKUP_ADMIN, None):
            raise Forbidden("backups are for backup admins; this token is not one",
                            f"log in with the {BACKUP_ADMIN} token (the controller writes "
                            f"it to its data directory's {BACKUP_ADMIN}.token)")

    def _platform_auth(self) -> None:
        """The job workers' endpoints: the platform token, and only it."""
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.startswith("Bearer ") else ""
        if not token or not hmac.compare_digest(token, self.server.controller.platform_token):
            raise Unauthorized("this endpoint is for the platform's job workers",
                               "give them the controller's platform_token")

    def _json(self, status: int, body: Any, close: bool = False) -> None:
        data = json.dumps(body, indent=None).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        """The request's JSON object (the server checked Content-Length already)."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_JSON:
            raise Invalid("request body too large", "send less than 1 MB of JSON")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise Invalid(f"request body is not JSON: {exc}", "send a JSON object") from exc
        if not isinstance(body, dict):
            raise Invalid(f"request body is JSON {type(body).__name__}, not an object",
                          "send a JSON object, e.g. {\"name\": \"myapp\"}")
        return body

    def _stream_start(self, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _client_gone(self) -> bool:
        """A follower that hung up: its socket reads as EOF. Checked between chunks so a
        quiet stream does not keep a thread forever."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream_end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    @property
    def c(self) -> Controller:
        return self.server.controller

    # -- endpoints ----------------------------------------------------------
    @route("GET", r"/v1/health")
    def health(self) -> None:
        self._json(200, {"ok": True, "runners": len(self.c.hosts())})

    @route("GET", r"/v1/hosts", scope="admin")
    def get_hosts(self) -> None:
        seq, _ = self.c.routes()
        runners = self.c.hosts()
        for name, info in runners.items():
            info["inventory"] = self.c.instances_on(name)
        self._json(200, {"runners": runners, "routes_seq": seq,
                         "stats_from": self.c.stats.current()["hosts"]})

    @route("POST", r"/v1/hosts/([A-Za-z0-9_.-]+)/drain", scope="admin")
    def drain_host(self, host: str) -> None:
        """{drain: true|false}: empty the host (its instances are replaced elsewhere
        first, then stopped; nothing new goes there) or let it take work again."""
        on = self._body().get("drain", True)
        if not isinstance(on, bool):
            raise Invalid("drain must be true or false", "send {\"drain\": false} to undo")
        if on and host not in self.c.hosts():
            raise NotFound(f"no live runner host {host!r}", "`berth hosts` lists them")
        self.c.drain_host(host, on)
        self._json(200, {"host": host, "draining": on})

    @route("GET", r"/v1/stats", scope="admin")
    def all_stats(self) -> None:
        self._stats(None)

    @route("GET", r"/v1/apps/([^/]+)/stats", scope="app", role="viewer")
    def app_stats(self, app: str) -> None:
        self.c.store.require_app(app)
        self._stats(app)

    def _stats(self, app: str | None) -> None:
        """Current figures; with follow=1 a JSON line per second until the client goes."""
        if self.query.get("follow") not in ("1", "true"):
            self._json(200, self.c.stats.current(app))
            return
        limit = self._int_query("count", 0, 0) or None
        self._stream_start("application/x-ndjson")
        seen = -1
        sent = 0
        while not self.server.stopping.is_set() and (limit is None or sent < limit) \
                and not self._client_gone():
            seen = self.c.stats.wait(seen, 1.0)
            self._chunk(json.dumps(self.c.stats.current(app)) + "\n")
            sent += 1
            time.sleep(1.0)
        self._stream_end()

    @route("GET", r"/v1/routes", scope="admin")
    def get_routes(self) -> None:
        seq, table = self.c.routes()
        self._json(200, {"seq": seq, "routes": table})

    # -- tokens (admins): a team's token reaches that team's apps only ----------
    @route("GET", r"/v1/tokens", scope="admin")
    def list_tokens(self) -> None:
        self._json(200, {"tokens": self.c.store.tokens()})

    @route("POST", r"/v1/tokens", scope="admin")
    def create_token(self) -> None:
        """{name, team?}: the token, shown this once (the store keeps its hash);
        without team an admin token."""
        body = self._body()
        team = body.get("team")
        if team is not None and not isinstance(team, str):
            raise Invalid("team must be a name", "`berth tokens create NAME --team TEAM`")
        name = str(body.get("name", ""))
        token = self.c.store.create_token(name, team)
        log.info("token created", extra={"token_name": name, "team": team})
        self._json(201, {"name": name, "team": team, "token": token})

    @route("DELETE", r"/v1/tokens/([^/]+)", scope="admin")
    def revoke_token(self, name: str) -> None:
        self.c.store.revoke_token(name)
        log.info("token revoked", extra={"token_name": name})
        self._json(200, {"revoked": name})

    @route("GET", r"/v1/apps", scope="any")
    def list_apps(self) -> None:
        apps, mine = [], self._mine()
        for name in self.c.store.list_apps():
            if mine is not None and name not in mine:
                continue
            rel = self.c.store.current_release(name)
            apps.append({"name": name, "release": rel.version if rel else None,
                         "url": self.c_url(name),
                         "role": "admin" if mine is None else mine[name]})
        self._json(200, {"apps": apps})

    def c_url(self, app: str) -> str:
        s = self.c.settings
        port = "" if s.balancer_port == 80 else f":{s.balancer_port}"
        return f"http://{app}.{s.base_domain}{port}/"

    @route("POST", r"/v1/apps", scope="any")
    def create_app(self) -> None:
        body = self._body()
        team = self.team
        if team is None and body.get("team") is not None:    # an admin names the owner
            team = str(body["team"])
        app = self.c.store.create_app(str(body.get("name", "")), team)
        self.c.logs.revive(app["name"])
        self.c.wake()
        self._json(201, {**app, "url": self.c_url(app["name"])})

    @route("GET", r"/v1/apps/([^/]+)", scope="app", role="viewer")
    def get_app(self, app: str) -> None:
        self.c.store.require_app(app)
        rel = self.c.store.current_release(app)
        self._json(200, {"name": app, "release": rel.public() if rel else None,
                         "formation": self.c.store.formation(app), "url": self.c_url(app),
                         "domains": self.c.store.domains(app).get(app, [])})

    @route("GET", r"/v1/apps/([^/]+)/limits", scope="app", role="viewer")
    def get_limits(self, app: str) -> None:
        self._json(200, {**self.c.store.limits(app),
                         "default_max_body_mb": self.c.settings.default_max_body_mb})
        # memory_mb / pids_max null: each runner's own default applies

    @route("PATCH", r"/v1/apps/([^/]+)/limits", scope="app", role="deployer")
    def patch_limits(self, app: str) -> None:
        body = self._body()
        keys = {"maintenance", "max_body_mb", "memory_mb", "pids_max"}
        if not isinstance(body, dict) or not set(body) <= keys or not body:
            raise Invalid("give maintenance (true/false) and/or max_body_mb, memory_mb, "
                          "pids_max (number or null)",
                          "use `berth maintenance on` or `berth limits --memory-mb 256`")
        if "maintenance" in body:
            if not isinstance(body["maintenance"], bool):
                raise Invalid("maintenance must be true or false",
                              "use `berth maintenance on` or `berth maintenance off`")
            self.c.store.set_maintenance(app, body["maintenance"])
        if "max_body_mb" in body:
            self.c.store.set_max_body(app, body["max_body_mb"])
        for name in ("memory_mb", "pids_max"):
            if name in body:
                self.c.store.set_process_limit(app, name, body[name])
        self.c.wake()
        self.get_limits(app)

    @route("DELETE", r"/v1/apps/([^/]+)", scope="app", role="owner")
    def destroy_app(self, app: str) -> None:
        slugs = self.c.store.slugs_of(app)
        for addon in self.c.store.addons(app):   # their job: a final dump, then drop
            if addon.state is not AddonState.DESTROYING:
                self.c.store.change_addon(addon.id, lambda a: a.destroy())
        self.c.jobqueue_poke()
        self.c.store.destroy_app(app)
        self.c.logs.forget(app)
        # its slugs, unless another app pushed the same bytes; runners remove the app's
        # files, user and cgroups when their heartbeat still lists it (reconcile)
        for sha in slugs - self.c.store.slugs_in_use():
            (self.c.data_dir / "slugs" / f"{sha}.tar.gz").unlink(missing_ok=True)
        self.c.wake()
        self._json(200, {"destroyed": app})

    # -- access: the owner team and the other teams' roles on an app -------------
    @route("GET", r"/v1/apps/([^/]+)/access", scope="app", role="viewer")
    def get_access(self, app: str) -> None:
        self._json(200, self.c.store.access(app))

    @route("POST", r"/v1/apps/([^/]+)/access", scope="app", role="owner")
    def grant_access(self, app: str) -> None:
        """{team, role}: give another team viewer, deployer or owner on the app
        (replacing the role it had)."""
        body = self._body()
        team, role = body.get("team"), body.get("role")
        if not isinstance(team, str) or not team:
            raise Invalid("give the team to grant a role to",
                          f"`berth access add TEAM --role viewer -a {app}`")
        if not isinstance(role, str) or role not in ROLES:
            raise Invalid(f"unknown role {role!r}: give one of {', '.join(ROLES)}",
                          f"`berth access add {team} --role viewer -a {app}`")
        before = self.c.store.grant_access(app, team, role)
        log.info("access granted", extra={"app": app, "team": team, "role": role,
                                          "by": self.team})
        self._json(200 if before else 201, {"app": app, "team": team, "role": role,
                                            "before": before})

    @route("DELETE", r"/v1/apps/([^/]+)/access/([^/]+)", scope="app", role="owner")
    def revoke_access(self, app: str, team: str) -> None:
        role = self.c.store.revoke_access(app, team)
        log.info("access revoked", extra={"app": app, "team": team, "by": self.team})
        self._json(200, {"app": app, "team": team, "revoked": role})

    @route("POST", r"/v1/apps/([^/]+)/builds", scope="app", role="deployer")
    def create_build(self, app: str) -> None:
        self.c.store.require_app(app)
        if self.headers.get("Content-Length") is None:
            raise BerthError("the push has no Content-Length", "push with `berth push`",
                             code="length_required", status=411)
        s = self.c.settings
        path, sha = slugcheck.receive(self.rfile, int(self.headers["Content-Length"]),
                                      self.c.data_dir / "uploads", s.max_upload_mb << 20)
        try:
            checked = slugcheck.check(path, sha, max_unpacked=s.max_unpacked_mb << 20,
                                      max_files=s.max_files)
            dest = self.c.data_dir / "slugs" / f"{sha}.tar.gz"
            path.replace(dest)
        finally:
            path.unlink(missing_ok=True)
        build = self.c.store.add_build(app, sha, checked.procfile, checked.manifest)
        self.c.logs.build_line(build, f"-----> Received {checked.size / 1024:.0f} kB, "
                                      f"{checked.files} files (slug {sha[:12]})")
        self.c.logs.build_line(build, "-----> Process types: " + ", ".join(
            f"{k}: {v}" for k, v in checked.procfile.items()))
        self.c.submit_build(build)
        self._json(201, {"build": build, "slug": sha, "procfile": checked.procfile})

    @route("GET", r"/v1/builds/([0-9a-f]+)", scope="build", role="viewer")
    def get_build(self, build: str) -> None:
        self._json(200, self.c.store.build(build))

    @route("GET", r"/v1/builds/([0-9a-f]+)/log", scope="build", role="viewer")
    def build_log(self, build: str) -> None:
        offset = self._int_query("offset", 0, 0)
        self.c.store.build(build)
        deadline = time.monotonic() + 1800
        self._stream_start()
        while time.monotonic() < deadline:
            lines, done = self.c.logs.build_read(build, offset, 1.0)
            offset += len(lines)
            self._chunk("".join(line + "\n" for line in lines))
            if done and not lines:
                break
        self._stream_end()

    @route("GET", r"/v1/apps/([^/]+)/ps", scope="app", role="viewer")
    def ps(self, app: str) -> None:
        self.c.store.require_app(app)
        self._json(200, {"instances": self.c.instances(app),
                         "formation": self.c.store.formation(app),
                         "runs": self.c.runs_of(app)})

    @route("POST", r"/v1/apps/([^/]+)/runs", scope="app", role="deployer")
    def create_run(self, app: str) -> None:
        """{command, tty?, cols?, rows?, detach?, term?} -> {run}: attach to it with
        GET /v1/runs/<run>/attach (an Upgrade) unless detached."""
        body = self._body()
        command = body.get("command") if isinstance(body, dict) else None
        if not isinstance(command, str):
            raise Invalid("give the command to run as a string",
                          f"use `berth run -a {app} -- COMMAND`")
        opts: dict[str, Any] = {}
        for name in ("tty", "detach"):
            if not isinstance(body.get(name, False), bool):
                raise Invalid(f"{name} must be true or false")
            opts[name] = bool(body.get(name, False))
        for name, default in (("cols", 80), ("rows", 24)):
            value = body.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool):
                raise Invalid(f"{name} must be a whole number")
            opts[name] = value
        term = body.get("term")
        if opts["tty"] and isinstance(term, str) and term and len(term) < 64:
            opts["env"] = {"TERM": term}
        if not opts["detach"]:
            opts["sink"] = Attachment()         # the client attaches next
        run = self.c.start_run(app, command, **opts)
        self._json(201, {"run": run.id, "app": app, "release": run.release,
                         "detach": run.detach, "proc": run.proc})

    @route("GET", r"/v1/runs/([0-9a-f]+)/attach", scope="run", role="deployer")
    def attach_run(self, run_id: str) -> None:
        """Upgrade to the run's frames (messaging/runframes.py) until it is over."""
        if self.headers.get("Upgrade", "").lower() != runframes.UPGRADE:
            raise BerthError(f"attach needs Upgrade: {runframes.UPGRADE}",
                             "attach with `berth run`", code="upgrade_required",
                             status=426)
        att = self.c.attach_run(run_id)
        self.send_response(101)
        self.send_header("Upgrade", runframes.UPGRADE)
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        attach.serve(self.connection, att, self.server.stopping)

    @route("POST", r"/v1/apps/([^/]+)/formation", scope="app", role="deployer")
    def scale(self, app: str) -> None:
        body = self._body()
        if not isinstance(body, dict) or not body:
            raise Invalid("nothing to scale", "give counts like `berth scale web=2`")
        formation = self.c.store.scale(app, body, self.c.settings.max_per_process_type)
        self.c.wake()
        self._json(200, {"formation": formation})

    @route("GET", r"/v1/apps/([^/]+)/config", scope="app", role="deployer")
    def get_config(self, app: str) -> None:
        self.c.store.require_app(app)
        rel = self.c.store.current_release(app)
        self._json(200, {"config": rel.config if rel else {}})

    @route("PATCH", r"/v1/apps/([^/]+)/config", scope="app", role="deployer")
    def patch_config(self, app: str) -> None:
        body = self._body()
        if not isinstance(body, dict) or not body:
            raise Invalid("no config changes given", "use `berth config set KEY=value`")
        rel = self.c.store.change_config(app, body)
        self.c.wake()
        self._json(200, {"release": rel.version, "config": rel.config})

    @route("GET", r"/v1/apps/([^/]+)/releases", scope="app", role="viewer")
    def releases(self, app: str) -> None:
        cur = self.c.store.current_release(app)
        self._json(200, {"releases": [r.public() for r in self.c.store.releases(app)],
                         "current": cur.version if cur else None})

    @route("POST", r"/v1/apps/([^/]+)/rollback", scope="app", role="deployer")
    def rollback(self, app: str) -> None:
        version = self._body().get("version")
        if version is not None and not isinstance(version, int):
            raise Invalid(f"release version must be a number, got {version!r}",
                          "use `berth rollback 3` or `berth rollback v3`")
        rel = self.c.store.rollback(app, version)
        self.c.wake()
        self._json(200, {"release": rel.public()})

    @route("GET", r"/v1/apps/([^/]+)/domains", scope="app", role="viewer")
    def list_domains(self, app: str) -> None:
        self.c.store.require_app(app)
        self._json(200, {"domains": self.c.store.domains(app).get(app, []),
                         "default": f"{app}.{self.c.settings.base_domain}"})

    @route("POST", r"/v1/apps/([^/]+)/domains", scope="app", role="owner")
    def add_domain(self, app: str) -> None:
        self.c.store.add_domain(app, str(self._body().get("hostname", "")),
                                self.c.settings.base_domain)
        self.c.wake()
        self._json(201, {"domains": self.c.store.domains(app).get(app, [])})

    @route("DELETE", r"/v1/apps/([^/]+)/domains/([^/]+)", scope="app", role="owner")
    def remove_domain(self, app: str, hostname: str) -> None:
        self.c.store.remove_domain(app, hostname)
        self.c.wake()
        self._json(200, {"domains": self.c.store.domains(app).get(app, [])})

    @route("GET", r"/v1/apps/([^/]+)/logs", scope="app", role="viewer")
    def app_logs(self, app: str) -> None:
        self.c.store.require_app(app)
        lines = self._int_query("lines", 100, 0, 5000)
        entries, last = self.c.logs.tail(app, lines)
        follow = self.query.get("follow") in ("1", "true")
        self._stream_start()
        self._chunk("".join(format_line(e) + "\n" for e in entries))
        while follow and not self.server.stopping.is_set():
            entries, last = self.c.logs.wait_after(app, last, 1.0)
            self._chunk("".join(format_line(e) + "\n" for e in entries))
            if not entries and self._client_gone():
                self.close_connection = True
                return
        self._stream_end()

    # -- addons (controller/addons.py; the work is done by controller/jobs.py) ----
    @route("GET", r"/v1/addons", scope="any")
    def list_addons(self) -> None:
        everything = self.query.get("all") in ("1", "true")
        mine = self._mine()
        self._json(200, {"addons": [a.public() for a in self.c.store.addons(
            with_destroyed=everything) if mine is None or a.app in mine]})

    @route("GET", r"/v1/apps/([^/]+)/addons", scope="app", role="viewer")
    def app_addons(self, app: str) -> None:
        self.c.store.require_app(app)
        everything = self.query.get("all") in ("1", "true")
        self._json(200, {"addons": [a.public() for a in self.c.store.addons(
            app, with_destroyed=everything)]})

    @route("POST", r"/v1/apps/([^/]+)/addons", scope="app", role="owner")
    def create_addon(self, app: str) -> None:
        """{engine, plan, quota_mb?, as?} -> 202 the addon, PROVISIONING; a job worker
        makes it (GET /v1/addons/<id> shows its state and last step)."""
        body = self._body()
        if not isinstance(body, dict):
            raise Invalid("give engine and plan", "`berth addons create postgres --plan shared`")
        self.c.require_jobs()
        engine, plan = str(body.get("engine", "")), str(body.get("plan", "shared"))
        quota = body.get("quota_mb", addon_rules.DEFAULT_QUOTA_MB.get((engine, plan)))
        alias = body.get("as")
        addon = self.c.store.create_addon(app, engine, plan, quota_mb=quota,
                                          name=str(alias) if alias else None)
        self.c.addon_log(addon.app, f"addon {addon.id} ({engine} {plan}) is being "
                                    "provisioned")
        self.c.jobqueue_poke()
        self._json(202, {"addon": addon.public()})

    @route("GET", r"/v1/addons/([a-z0-9-]+)", scope="addon", role="viewer")
    def get_addon(self, addon_id: str) -> None:
        """The addon, and its servers as the runners supervising them report them."""
        addon = self.c.store.addon(addon_id).public()
        addon["servers"] = self.c.services_of(addon_id)
        self._json(200, {"addon": addon})

    def _addon_changed(self, addon: Addon, release: Release | None, what: str) -> None:
        if release is not None:
            self.c.addon_log(addon.app, f"{what}: release v{release.version}")
            self.c.wake()
        self.c.jobqueue_poke()
        self._json(200, {"addon": addon.public(),
                         "release": release.version if release else None})

    @route("POST", r"/v1/addons/([a-z0-9-]+)/destroy", scope="addon", role="owner")
    def destroy_addon(self, addon_id: str) -> None:
        """{confirm: <the app's name>}: its variables leave the app at once (a new
        release), then a job worker drops it after a final dump."""
        body = self._body()
        addon = self.c.store.addon(addon_id)
        if not isinstance(body, dict) or body.get("confirm") != addon.app:
            raise Invalid(f"destroying {addon.id} needs the name of its app to confirm",
                          f"`berth addons destroy {addon.id} --confirm {addon.app}`")
        self.c.require_jobs()
        addon, release = self.c.store.change_addon(addon_id, lambda a: a.destroy(),
                                                   f"Destroy {addon_id}")
        self._addon_changed(addon, release, f"addon {addon_id} is being destroyed")

    @route("POST", r"/v1/addons/([a-z0-9-]+)/rotate", scope="addon", role="deployer")
    def rotate_addon(self, addon_id: str) -> None:
        self.c.require_jobs()
        addon, release = self.c.store.change_addon(addon_id, lambda a: a.rotate())
        self._addon_changed(addon, release, f"addon {addon_id} gets new credentials")

    @route("POST", r"/v1/addons/([a-z0-9-]+)/retry", scope="addon", role="deployer")
    def retry_addon(self, addon_id: str) -> None:
        self.c.require_jobs()
        addon, release = self.c.store.change_addon(addon_id, lambda a: a.retry())
        self._addon_changed(addon, release, f"addon {addon_id} is provisioned again")

    @route("POST", r"/v1/addons/([a-z0-9-]+)/attachments", scope="addon", role="deployer")
    def attach_addon(self, addon_id: str) -> None:
        """{as, style: url|split}: more names for the addon in its app's env."""
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("as"), str):
            raise Invalid("give the name to attach as", "`berth addons attach NAME --as "
                          "STORAGE`")
        addon, release = self.c.store.attach_addon(addon_id, body["as"],
                                                   str(body.get("style") or "url"))
        self._addon_changed(addon, release, f"attached {addon_id} as {body['as']}")

    @route("DELETE", r"/v1/addons/([a-z0-9-]+)/attachments/([A-Za-z0-9_]+)", scope="addon",
           role="deployer")
    def detach_addon(self, addon_id: str, name: str) -> None:
        addon, release = self.c.store.detach_addon(addon_id, name)
        self._addon_changed(addon, release, f"detached {addon_id} as {name}")

    # -- the job workers' side (platform token) ----------------------------------
    @route("GET", r"/v1/platform/addons")
    def platform_addons(self) -> None:
        """?quota=1: the ready addons whose storage the quota check measures."""
        found = [a for a in self.c.store.addons() if a.state is AddonState.READY]
        if self.query.get("quota") in ("1", "true"):
            found = [a for a in found if a.quota_mb and a.plan == "shared"
                     and a.engine == "postgres"]
        self._json(200, {"addons": [a.for_worker() for a in found]})

    @route("GET", r"/v1/platform/addons/([a-z0-9-]+)")
    def platform_addon(self, addon_id: str) -> None:
        self._json(200, self.c.store.addon(addon_id).for_worker())

    @route("POST", r"/v1/platform/addons/([a-z0-9-]+)/report")
    def platform_report(self, addon_id: str) -> None:
        """{op, outcome: step|done|failed, step?, credentials?, error?, final_dump?}"""
        body = self._body()
        if not isinstance(body, dict):
            raise Invalid("a report is a JSON object")
        fields = {k: body.get(k) for k in ("credentials", "error", "final_dump", "services")}
        outcome = str(body.get("outcome", ""))
        addon, release = self.c.store.change_addon(
            addon_id, lambda a: a.report(str(body.get("op", "")), outcome,
                                         step=str(body.get("step") or ""), **fields),
            {"provision": f"Attach {addon_id}",
             addon_rules.MOVED: f"Follow {addon_id} to its new nodes"}.get(
                str(body.get("op")), f"Rotate {addon_id} credentials"))
        if outcome != "step" and (body.get("op") != addon_rules.MOVED or release):
            what = {"done": addon.state.value, "failed": "failed"}[outcome]
            if body.get("op") == addon_rules.MOVED:
                what = addon.step or "its nodes changed"
            error = (addon.error or {}).get("message") if outcome == "failed" else None
            self.c.addon_log(addon.app, f"addon {addon_id} {body.get('op')}: {what}"
                             + (f" ({error})" if error else "")
                             + (f"; release v{release.version}" if release else ""))
        if release is not None:
            self.c.wake()
        self._json(200, {"addon": addon.public(),
                         "release": release.version if release else None})

    @route("GET", r"/v1/platform/hosts")
    def platform_hosts(self) -> None:
        """{live: [address], lost: [address], db: [address]}: where runners answer,
        where one was lost and none answers since, and the db hosts (least busy
        first)."""
        self._json(200, self.c.host_addresses())

    @route("POST", r"/v1/platform/addons/([a-z0-9-]+)/pause")
    def platform_pause(self, addon_id: str) -> None:
        """{seconds}: a backup job stops the addon's servers: runners stop serving them
        for that long (0: serve them again); answered once none is reported running.
        {supervised}: whether a runner was serving them."""
        seconds = self._body().get("seconds", PAUSE_SECONDS)
        if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 86400:
            raise Invalid(f"seconds={seconds!r} is not a number from 0 to 86400",
                          "give how long the servers stay stopped, 0 to serve them again")
        self.c.store.addon(addon_id)            # 404 for an addon the store lacks
        sup = ControllerSupervisor(self.c)
        if seconds == 0:
            sup.resume(addon_id)
            self._json(200, {"paused": False})
            return
        self._json(200, {"paused": True, "supervised": sup.pause(addon_id, seconds)})

    @route("POST", r"/v1/platform/addons/([a-z0-9-]+)/quota")
    def platform_quota(self, addon_id: str) -> None:
        """{state: ok|warn|blocked|restored, usage_mb}: a change goes to the app's log."""
        body = self._body()
        state = str(body.get("state", "")) if isinstance(body, dict) else ""
        usage = body.get("usage_mb") if isinstance(body, dict) else None
        usage = float(usage) if isinstance(usage, (int, float)) else None
        changed = self.c.store.set_addon_quota(addon_id, state, usage)
        addon = self.c.store.addon(addon_id)
        if changed and state != "ok":
            self.c.addon_log(addon.app, addon_rules.quota_line(addon))
        self._json(200, {"addon": addon.public(), "changed": changed})

    # -- backups (the backup-admin role): controller/backups.py -----------------------
    @route("GET", r"/v1/backups")
    def backup_list(self) -> None:
        cat = self.server.backups()
        self._json(200, {"volumes": [cat.describe(pv) for pv in cat.volumes()]})

    @route("GET", r"/v1/backups/([A-Za-z0-9_.-]+)")
    def backup_show(self, name: str) -> None:
        cat = self.server.backups()
        self._json(200, cat.describe(cat.volume(name)))

    @route("POST", r"/v1/backups/([A-Za-z0-9_.-]+)/snapshots")
    def backup_snapshot(self, name: str) -> None:
        snap = self.server.backups().snapshot(name)
        self._json(200, {"snapshot": snap.name})

    @route("POST", r"/v1/backups/prune")
    def backup_prune(self) -> None:
        """{dry_run?, volume?}: every decision with its reason."""
        body = self._body()
        cat = self.server.backups()
        names = [str(body["volume"])] if body.get("volume") else \
            [pv.name for pv in cat.volumes()]
        out = {}
        for name in names:
            out[name] = [{"snapshot": snap.name, "keep": keep, "why": why} for snap, keep, why
                         in cat.prune(name, dry_run=bool(body.get("dry_run")))]
        self._json(200, {"policy": str(cat.policy), "dry_run": bool(body.get("dry_run")),
                         "policies": {name: str(cat.policy_for(name)) for name in names},
                         "volumes": out})

    @route("POST", r"/v1/backups/([A-Za-z0-9_.-]+)/restore")
    def backup_restore(self, name: str) -> None:
        """{at?: ISO UTC, into?: new volume, from_copies?: a dir of verified offsite
        copies on this host}: NDJSON lines {step} then {done} or {error}."""
        body = self._body()
        cat = self.server.backups()
        pv = cat.volume(name)
        at, into = _when(body.get("at")), body.get("into") or None
        copies = Path(str(body["from_copies"])) if body.get("from_copies") else None
        stop = start = None
        if pv.kind == "app-data" and into is None:
            stop, start = self._app_consumers(pv.owner)

        def work(progress: Callable[[str], None]) -> dict[str, Any]:
            done = cat.restore(name, at, into=into, from_copies=copies, stop=stop,
                               start=start, progress=progress)
            return {"volume": done.volume.name, "path": str(done.volume.path),
                    "source": done.source.name, "kept": done.kept.name if done.kept else None,
                    "seconds": round(done.seconds, 3)}
        self._job_stream(work)

    @route("POST", r"/v1/backups/([A-Za-z0-9_.-]+)/verify")
    def backup_verify(self, name: str) -> None:
        body = self._body()
        at = _when(body.get("at"))
        cat = self.server.backups()
        cat.volume(name)
        self._job_stream(lambda progress: cat.verify(name, at, progress=progress))

    def _job_stream(self, work: Callable[[Callable[[str], None]], dict[str, Any]]) -> None:
        """Run a long backup step here, streaming its steps as NDJSON as they come."""
        self._stream_start("application/x-ndjson")

        gone = [False]

        def send(event: dict[str, Any]) -> None:
            """A client that went away does not stop the job half-way (its consumers
            stopped): the job goes on, unwatched."""
            if gone[0]:
                return
            try:
                self._chunk(json.dumps(event) + "\n")
            except OSError:
                gone[0] = True
                log.warning("backup job's client went away; the job goes on")
        try:
            send({"done": work(lambda step: send({"step": step}))})
        except BerthError as exc:
            send({"error": exc.to_dict()})
        except Exception as exc:
            log.exception("backup job failed")
            send({"error": internal(exc).to_dict()})
        if not gone[0]:
            self._stream_end()

    def _app_consumers(self, app: str) -> tuple[Callable[[], None], Callable[[], None]]:
        """An app's instances as a restore's consumers: scaled to 0 (and waited for
        until none is reported), then back to the formation they had."""
        saved = self.c.store.formation(app)
        maximum = self.c.settings.max_per_process_type

        def stop() -> None:
            if saved:       # written down first: a restarted controller scales it back
                remember_formation(self.c.data_dir, app, saved)
                self.c.store.scale(app, {proc: 0 for proc in saved}, maximum)
                self.c.wake()
            deadline = time.monotonic() + APP_STOP_SECONDS
            while self.c.instances(app):
                if time.monotonic() > deadline:
                    start()
                    raise BerthError(f"{app}'s instances did not stop within "
                                     f"{APP_STOP_SECONDS:g} s; nothing was restored",
                                     "see `berth ps` and the runner's log; try again",
                                     code="consumers_running", status=503)
                time.sleep(0.1)

        def start() -> None:
            if saved:
                self.c.store.scale(app, saved, maximum)
                self.c.wake()
                forget_formation(self.c.data_dir, app)
        return stop, start

    @route("GET", r"/v1/slugs/([^/]+)")
    def get_slug(self, sha: str) -> None:
        if not SLUG_NAME.match(sha):
            raise Invalid(f"invalid slug id {sha!r}",
                          "slug ids are the 64 hex digits of a sha256; the runner got a bad URL")
        path: Path = self.c.data_dir / "slugs" / f"{sha}.tar.gz"
        if not path.exists():
            raise NotFound(f"slug {sha} not found", "push the app again")
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                self.wfile.write(chunk)


def _when(value: Any) -> datetime | None:
    """A restore's `at`: an ISO 8601 time with its offset (the CLI sends UTC)."""
    if value in (None, ""):
        return None
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        raise Invalid(f"cannot read the time {value!r}",
                      "send ISO 8601 with an offset, e.g. 2026-11-30T14:00:00+00:00") from None
    if at.tzinfo is None:
        raise Invalid(f"the time {value!r} has no UTC offset",
                      "send it in UTC, e.g. 2026-11-30T14:00:00+00:00")
    return at.astimezone(UTC)


def limits(settings: Any) -> ServerLimits:
    """The server's bounds, from the controller's api_* settings."""
    return ServerLimits(workers=settings.api_workers, streams=settings.api_streams,
                        queue=settings.api_queue, max_connections=settings.api_max_connections,
                        header_timeout=settings.api_header_timeout,
                        body_timeout=settings.api_body_timeout,
                        idle_timeout=settings.api_idle_timeout,
                        io_timeout=settings.api_io_timeout, max_body_buffered=MAX_JSON)


class ApiServer(BoundedHTTPServer):
    def __init__(self, controller: Controller, host: str, port: int) -> None:
        super().__init__((host, port), Handler, limits(controller.settings), is_long)
        self.controller = controller
        self._backups: Catalog | None = None

    def backups(self) -> Catalog:
        """The backup volumes this host holds (one-host platform: the job workers')."""
        if self._backups is None:
            self._backups = Catalog.from_settings(
                self.controller.settings, supervisor=ControllerSupervisor(self.controller))
        return self._backups
