"""CURVE on every ZeroMQ channel: who may talk to the controller at all.

Keys (zmq.auth certificate files) live in one directory, made by `berth admin init`
(`init` below), 0700 and root's:

    controller.key, controller.key_secret   the controller's pair (every binding end)
    hosts/<name>.key, hosts/<name>.key_secret   a runner's or balancer's own pair
    admitted/<name>.key                     the public keys the controller accepts

On real machines each host gets only its own pair and the controller's public key;
on one machine (`berth up`, the tests) one directory holds them all, and each
platform makes its own, so two platforms on one machine can never talk to each other
by accident: a peer whose key is not admitted fails the CURVE handshake on every
channel, before any message of it is read.

A process states its keys once (`use`), from its `keys_dir` setting; from then on
`messaging.channels.bind` makes every binding socket a CURVE server and puts a ZAP
handler (zmq.auth's ThreadAuthenticator) on its context, checking the client's key
against `admitted/` on every connection (re-read when the directory changes, so a
host admitted with `berth admin add-host` needs no restart), and
`messaging.channels.connect` makes every connecting socket a CURVE client of the
controller's key. No keys_dir: plain sockets, and the daemon says so at start.

This module imports pyzmq only inside functions, like channels.py.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from messaging.errors import BerthError

if TYPE_CHECKING:
    import zmq

log = logging.getLogger(__name__)

SERVER = "controller"
DOMAIN = "berth"


@dataclass(frozen=True)
class Keys:
    """This process's pair, the controller's public key, and (controller only) the
    admitted directory."""

    name: str
    public: bytes
    secret: bytes
    server_public: bytes
    admitted: Path | None = None


_current: Keys | None = None
_authenticators: dict[int, Any] = {}        # id(context) -> its ZAP handler


def init(keys_dir: Path, hosts: list[str]) -> list[str]:
    """Make the controller's pair (once) and a pair per host not made yet, each
    admitted. Returns the names made now."""
    import zmq.auth

    made = []
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    for sub in ("hosts", "admitted"):
        (keys_dir / sub).mkdir(exist_ok=True)
        (keys_dir / sub).chmod(0o700)
    if not (keys_dir / f"{SERVER}.key_secret").exists():
        zmq.auth.create_certificates(str(keys_dir), SERVER)
        made.append(SERVER)
    for name in hosts:
        check_name(name)
        if not (keys_dir / "hosts" / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(keys_dir / "hosts"), name)
            made.append(name)
        shutil.copyfile(keys_dir / "hosts" / f"{name}.key",
                        keys_dir / "admitted" / f"{name}.key")
    for path in keys_dir.rglob("*.key_secret"):
        path.chmod(0o600)
    return made


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name == SERVER:
        raise BerthError(f"{name!r} is not a host name for a key",
                         "use the host's id (its host_id setting), e.g. runner-2")


def load(keys_dir: Path, name: str) -> Keys:
    """The keys of `name` (the controller: SERVER) from a keys dir."""
    import zmq.auth

    try:
        server_public, _ = zmq.auth.load_certificate(str(keys_dir / f"{SERVER}.key"))
        if name == SERVER:
            public, secret = zmq.auth.load_certificate(
                str(keys_dir / f"{SERVER}.key_secret"))
            return Keys(name, public, secret or b"", server_public, keys_dir / "admitted")
        public, secret = zmq.auth.load_certificate(
            str(keys_dir / "hosts" / f"{name}.key_secret"))
    except (OSError, ValueError) as exc:
        raise BerthError(f"no CURVE keys for {name} in {keys_dir} ({exc})",
                         f"run `berth admin init --keys-dir {keys_dir} --host {name}` "
                         "(or leave keys_dir empty for plain sockets)") from None
    if not secret:
        raise BerthError(f"the key file of {name} in {keys_dir} has no secret key",
                         "make its keys again with `berth admin init`")
    return Keys(name, public, secret, server_public)


def use(keys: Keys | None) -> None:
    """State this process's keys: every socket channels.py opens from now on uses
    them (None: plain sockets)."""
    global _current
    _current = keys


def use_setting(keys_dir: str, name: str) -> Keys | None:
    """`use` the keys a daemon's settings name; warns when there are none."""
    if not keys_dir:
        log.warning("no keys_dir: the ZeroMQ channels are plain, open to any local "
                    "process; run `berth admin init` and set keys_dir")
        use(None)
        return None
    keys = load(Path(keys_dir), name)
    use(keys)
    return keys


def current() -> Keys | None:
    return _current


class _Admitted:
    """The ZAP callback: a client key is admitted when its certificate is in the
    admitted directory (re-read whenever the directory changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = -1.0
        self._keys: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        import zmq.auth

        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return False
        if mtime != self._mtime:
            self._keys = set(zmq.auth.load_certificates(str(self.path)).keys())
            self._mtime = mtime
        ok = key in self._keys
        if not ok:
            log.warning("refused a ZeroMQ peer with an unknown CURVE key")
        return ok


def serve(sock: zmq.Socket, ctx: zmq.Context) -> None:
    """Make a binding socket a CURVE server under the current keys."""
    keys = _current
    if keys is None:
        return
    if keys.admitted is None:
        raise BerthError(f"{keys.name} binds a channel but holds no admitted keys",
                         "only the controller binds channels")
    key = id(ctx)
    if key not in _authenticators:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(DOMAIN, credentials_provider=_Admitted(keys.admitted))
        _authenticators[key] = auth
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = DOMAIN.encode()


def client(sock: zmq.Socket) -> None:
    """Make a connecting socket a CURVE client of the controller."""
    keys = _current
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def stop(ctx: zmq.Context) -> None:
    """End the ZAP handler of a context (before the context is closed)."""
    auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()
