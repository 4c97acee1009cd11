"""Message types and their fields: the shape of every body on every channel.

A message body is JSON: the envelope fields (v, type, id, sender, ts) and the
declared fields below. Unknown fields are kept (newer peers may add some); missing
required ones are a ProtocolError.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from messaging.errors import ProtocolError


@dataclass(frozen=True)
class MessageType:
    name: str
    required: dict[str, type | tuple[type, ...]]
    optional: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    doc: str = ""


_OPT_DICT = (dict, type(None))

MESSAGE_TYPES: dict[str, MessageType] = {m.name: m for m in (
    MessageType("command", {"action": str, "args": dict},
                doc="Controller -> runner. `action` is one of ACTIONS; the reply "
                    "carries the same id in `re`."),
    MessageType("reply", {"re": str, "ok": bool},
                {"result": dict, "error": _OPT_DICT},
                doc="Runner -> controller answer to a command; error is "
                    "{code, message, hint}."),
    MessageType("heartbeat", {"host": str, "interval": (int, float)},
                {"address": str, "inventory": list, "seq": int, "apps": list,
                 "runs": list, "static_port": int, "static_roots": dict,
                 "addon_ports": list},
                doc="Both ways over control. A runner's carries its full inventory "
                    "(every instance with app, release, proc, port, state, "
                    "restarts, oom_kills) so the controller never depends on a single "
                    "event, and `apps`: every app that has files, a user or cgroups "
                    "on the host, so a destroyed app's leftovers are found and removed "
                    "even on a host that was away when it was destroyed; `runs`: every "
                    "one-off run on the host (shapes.RunItem), apart from the "
                    "inventory so the reconciler never takes one for an instance; "
                    "`static_port`: where the host's static file server listens (on "
                    "`address`) while it is up, absent otherwise, and `static_roots` "
                    "{app: {release version: URL prefix}}: the releases whose collected "
                    "static files it serves (shapes.HostReport). The controller's "
                    "carries `addon_ports`: the TCP ports of the addon servers (the "
                    "store's ready addons), which runners let apps reach on loopback "
                    "(runner/firewall.py)."),
    MessageType("beat", {"host": str, "seq": int, "loop_age": (int, float)},
                doc="Runner -> controller over control, from a thread of its own on a "
                    "second DEALER (identity `<host>` + BEAT_SUFFIX), every half "
                    "heartbeat interval: liveness only, so a loop busy starting "
                    "hundreds of instances never looks dead. `loop_age`: seconds since "
                    "the runner's loop last stepped; the controller counts a beat only "
                    "from a host whose full heartbeat it knows and only while loop_age "
                    "is under the dead limit (a wedged loop answers no command)."),
    MessageType("route_update", {"seq": int, "app": str}, {"route": _OPT_DICT},
                doc="One app's route; route None means the app is gone. Route: "
                    "{hosts: [..], backends: [{id, address, port}], reason: str, "
                    "maintenance: bool (answer 503 + Retry-After), max_body: int "
                    "(request body limit in bytes, 413 beyond), static?: {prefix, "
                    "backends, releases} (GET/HEAD under prefix go to those static "
                    "file servers, for those release versions)}; see shapes.Route."),
    MessageType("route_tick", {"seq": int},
                doc="The publisher's latest sequence number, every second."),
    MessageType("snapshot_request", {}, doc="Replica -> publisher: send the table."),
    MessageType("snapshot", {"seq": int, "routes": dict},
                doc="The whole table {app: route} as of `seq`."),
    MessageType("stats", {"host": str, "interval": (int, float), "apps": dict},
                {"kind": str, "totals": dict},
                doc="One host's figures for the last interval. apps: {app: {requests, "
                    "status: {1xx..5xx: n}, bytes_in, bytes_out, p50_ms, p95_ms, "
                    "p99_ms, open}}; kind is 'balancer' or 'runner'."),
    MessageType("log_batch", {"entries": list},
                doc="Many `log` bodies at once ({app, line, proc, ...} each), for hot "
                    "paths such as the balancer's access log: one message per 100 ms "
                    "instead of one per request."),
    MessageType("log", {"app": str, "line": str},
                {"proc": str, "release": int, "host": str, "stream": str,
                 "build": str, "instance": str},
                doc="One line of tenant-visible output; `proc` is web/worker/..., "
                    "'build' for build output, 'platform' for platform events."),
    # one-off runs, on the attach channel (bytes travel base64 in `data`)
    MessageType("run_started", {"run": str}, {"pid": int},
                doc="Runner -> controller: the run's command is spawned."),
    MessageType("run_output", {"run": str, "data": str, "stream": str},
                doc="Runner -> controller: bytes the command wrote; stream is 'tty' "
                    "(a run with a terminal), 'stdout' or 'stderr'."),
    MessageType("run_exit", {"run": str, "code": int}, {"reason": str, "error": _OPT_DICT},
                doc="Runner -> controller, after the run's last output: its exit code "
                    "(128+N for death by signal N); error {code, message, hint} when it "
                    "never started (prepare failed)."),
    MessageType("run_input", {"run": str, "data": str}, {"eof": bool},
                doc="Controller -> runner: bytes for the command's terminal or stdin; "
                    "eof closes its stdin (runs without a terminal)."),
    MessageType("run_resize", {"run": str, "cols": int, "rows": int},
                doc="Controller -> runner: the client's window size (TIOCSWINSZ; the "
                    "kernel sends SIGWINCH to the foreground process group)."),
    MessageType("run_signal", {"run": str, "signal": str},
                doc="Controller -> runner: deliver a signal (one of RUN_SIGNALS) to the "
                    "command's foreground process group."),
    MessageType("run_end", {"run": str}, {"reason": str},
                doc="Controller -> runner: the client went away: SIGHUP to the command's "
                    "session, SIGKILL to everything of the run after the runner's "
                    "stop_grace."),
    MessageType("run_ack", {"run": str, "bytes": int},
                doc="Either way: the receiver consumed `bytes` more of the run's stream "
                    "(output delivered to the client / input written to the command), "
                    "which the sender may now send again (credit window)."),
    # leases, on the locks channel (messaging/locks.py; the controller's controller/locks.py)
    MessageType("lock_acquire", {"name": str, "owner": str, "ttl": (int, float)},
                doc="Client -> controller: hold lease `name` for `ttl` seconds as "
                    "`owner`. Granted when it is free, expired, or already `owner`'s "
                    "(then renewed); refused while another owner holds it."),
    MessageType("lock_renew", {"name": str, "owner": str, "fence": int,
                               "ttl": (int, float)},
                doc="Client -> controller: `ttl` more seconds from now for the lease "
                    "granted with `fence`; refused (lost) once it expired or was "
                    "granted again."),
    MessageType("lock_release", {"name": str, "owner": str, "fence": int},
                doc="Client -> controller: give the lease back."),
    MessageType("lock_reply", {"re": str, "ok": bool},
                {"lease": _OPT_DICT, "error": _OPT_DICT},
                doc="Controller -> client, answering the request with id `re`: the "
                    "lease as it is now (shapes.Lease: name, owner, fence, ttl, "
                    "expires_in), and when not ok the error {code, message, hint} "
                    "(code `lease_busy` with the holder's lease, or `lease_lost`)."),
    MessageType("lock_event", {"event": str, "lease": dict},
                doc="Controller PUB: `event` is one of LOCK_EVENTS; `lease` "
                    "(shapes.Lease) as it was granted."),
)}

LOCK_EVENTS = ("acquired", "released", "expired")

# credit window of a run's stream, each direction: bytes sent and not yet acknowledged
RUN_WINDOW = 256 * 1024
RUN_CHUNK = 16 * 1024                   # most bytes in one run_output / run_input
RUN_SIGNALS = ("INT", "QUIT", "TERM", "HUP", "USR1", "USR2")

@dataclass(frozen=True)
class Action:
    """A control action: the args a command must carry, the ones it may carry, and
    what the runner does. Each has exactly one handler in the runner's registry
    (runner/actions.py); a test walks both lists."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    doc: str = ""


ACTIONS: dict[str, Action] = {a.name: a for a in (
    Action("prepare", ("build", "app", "slug", "slug_url"), ("manifest", "env"),
           "Fetch and unpack a slug, build or reuse its virtualenv (with the interpreter "
           "`manifest` (messaging.manifest.Manifest) asks for), and for a Django project "
           "collect its static files with `env`; output goes to the logs channel with "
           "build=<id>. Replies when done with {venv, reused, seconds, release_dir, "
           "detected: {framework, settings_module, injected, static: {dir, url}}, "
           "log_lines}, or an error carrying log_lines."),
    Action("start", ("instance", "app", "release", "proc", "command", "env", "slug",
                     "slug_url"), ("host_header", "limits", "manifest"),
           "Start one instance of a process type; replies {accepted} at once, the "
           "instance then appears in heartbeats (PREPARING, STARTING, RUNNING...). "
           "`limits` (shapes.Limits) overrides the runner's defaults; `manifest` "
           "(messaging.manifest.Manifest) picks the interpreter and health-check path."),
    Action("stop", ("instance",), ("grace",),
           "Stop one instance gracefully (SIGTERM, then SIGKILL after `grace`); replies "
           "{stopping, known} at once."),
    Action("run", ("run", "app", "release", "command", "env", "slug", "slug_url"),
           ("tty", "cols", "rows", "detach", "timeout", "limits", "manifest"),
           "Start a one-off run of `command` (through /bin/sh) in the release's code, "
           "venv, environment and user, in its own jail and cgroup (`limits` and "
           "`manifest` as for start); replies {accepted} at once. With `tty` the command gets a "
           "pseudo-terminal of cols x rows as its controlling terminal; without, "
           "separate stdin/stdout/stderr. Its streams travel on the attach channel "
           "(run_started, run_output, run_exit); `detach` sends its output to the app's "
           "logs as proc run.<id> instead. Ended after `timeout` seconds; never "
           "restarted."),
    Action("serve", ("service",), (),
           "Supervise an addon's server (`service`: shapes.ServiceSpec) with the process "
           "state machine of app instances: adopt the process its pidfile names when it "
           "runs, else start argv; restart it with backoff when it dies; replies "
           "{accepted} at once; it then shows in heartbeats under `services`."),
    Action("unserve", ("service",), ("grace",),
           "Stop supervising the service with id `service`: its stop_signal, SIGKILL "
           "after `grace`; replies {stopping, known} at once."),
    Action("destroy_app", ("app",), (),
           "Stop the app's instances and runs and remove every file, cgroup and the "
           "system user "
           "it had on the host; replies {destroyed} when done."),
)}


def check_args(action: str, args: dict[str, object]) -> Action:
    """The declaration of `action`, once its args are known to be complete."""
    decl = ACTIONS.get(action)
    if decl is None:
        raise ProtocolError(f"unknown control action {action!r}",
                            f"use one of: {', '.join(sorted(ACTIONS))}")
    missing = [a for a in decl.required if a not in args]
    if missing:
        raise ProtocolError(f"command {action!r} lacks args: {', '.join(missing)}")
    return decl
