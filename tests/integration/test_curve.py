"""Nobody gets in uninvited: a real platform (controller, runner, balancer) runs with
its own CURVE keys, and a ZeroMQ peer whose key is not admitted is refused on every
channel, tested per channel by attempt: with a key pair of its own (and the
controller's public key, as an attacker who read it would have), and with no CURVE
at all. The refusal is the handshake's (the socket monitor reports it; nothing the
peer sends is read). A forged heartbeat claiming another app's instance changes
nothing; the same heartbeat from an admitted key does show, so the test can tell."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from cli.client import Client
from cli.credentials import Credentials
from cli.localplatform import LocalPlatform, Ports
from messaging import curve
from messaging.channels import CHANNELS
from messaging.envelope import make, send

pytestmark = pytest.mark.timeout(180)

REFUSED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


@pytest.fixture(scope="module")
def platform(berth_root: Path) -> Iterator[LocalPlatform]:
    p = LocalPlatform(berth_root / f"cv-{uuid.uuid4().hex[:6]}", Ports.free(), jobs=False)
    try:
        p.start()
        yield p
    finally:
        p.stop()


def handshake(platform: LocalPlatform, channel: str, keys: tuple[bytes, bytes] | None,
              timeout: float = 5.0) -> int:
    """Connect to `channel` as its clients do, with `keys` (public, secret) or plain;
    the first handshake outcome the socket monitor reports."""
    ctx = zmq.Context.instance()
    ch = CHANNELS[channel]
    sock = ctx.socket(getattr(zmq, ch.connect_type))
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        server_public, _ = zmq.auth.load_certificate(
            str(platform.keys_dir / f"{curve.SERVER}.key"))
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_serverkey = server_public
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(ch.endpoint(platform.ports.for_channel(channel)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if monitor.poll(200):
                event = recv_monitor_message(monitor)["event"]
                if event in REFUSED or event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return int(event)
        return 0
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_an_unknown_key_is_refused_on_every_channel(platform: LocalPlatform, channel: str):
    stranger = zmq.curve_keypair()
    assert handshake(platform, channel, stranger) in REFUSED
    assert handshake(platform, channel, None) in REFUSED          # no CURVE at all
    # an admitted host's key gets in: the refusal above is the key's, not the port's
    name = f"ok-{channel.replace('_', '-')}"
    curve.init(platform.keys_dir, [name])
    admitted = curve.load(platform.keys_dir, name)
    assert handshake(platform, channel, (admitted.public, admitted.secret)) == \
        zmq.EVENT_HANDSHAKE_SUCCEEDED


def _heartbeat(platform: LocalPlatform, keys: tuple[bytes, bytes], host: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, host.encode())
    server_public, _ = zmq.auth.load_certificate(str(platform.keys_dir / "controller.key"))
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.curve_serverkey = server_public
    sock.connect(CHANNELS["control"].endpoint(platform.ports.control))
    forged = {"instance": "forged1", "app": "victim", "release": 1, "proc": "web",
              "state": "RUNNING", "address": "127.0.0.1", "port": 9}
    try:
        for seq in range(1, 6):
            try:        # a DEALER with no peer (refused) would wait for one forever
                send(sock, make("heartbeat", host, host=host, interval=1.0,
                                address="127.0.0.9", inventory=[forged], seq=seq),
                     flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.2)
    finally:
        sock.close(0)


def test_a_forged_heartbeat_changes_nothing(platform: LocalPlatform):
    api = Client(Credentials(platform.api_url, platform.admin_token), timeout=10)
    _heartbeat(platform, zmq.curve_keypair(), "intruder")
    time.sleep(1.0)
    assert "intruder" not in api.get("/v1/hosts")["runners"]
    # the same heartbeat with an admitted key is heard (and the controller is told
    # about a host it will later call lost): the test above could have failed
    curve.init(platform.keys_dir, ["friend"])
    friend = curve.load(platform.keys_dir, "friend")
    _heartbeat(platform, (friend.public, friend.secret), "friend")
    deadline = time.monotonic() + 5
    while "friend" not in api.get("/v1/hosts")["runners"]:
        assert time.monotonic() < deadline, "an admitted host's heartbeat was not heard"
        time.sleep(0.1)
