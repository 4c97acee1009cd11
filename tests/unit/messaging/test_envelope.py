import pytest
import zmq

from messaging import channels, envelope
from messaging.errors import ProtocolError


def test_roundtrip_keeps_fields_and_envelope():
    msg = envelope.make("log", "runner-1", app="a", line="hi", proc="web")
    back = envelope.decode(envelope.encode(msg))
    assert back.type == "log" and back["line"] == "hi" and back.sender == "runner-1"
    assert back.id == msg.id



def test_non_ascii_and_lone_surrogates_roundtrip_as_ascii_json():
    # the body stays ASCII JSON (\u escapes): valid UTF-8 for every receiver, a
    # lone surrogate (a surrogateescape'd file name) included, which a UTF-8 body
    # (ensure_ascii=False) could not even encode; and on ASCII-heavy batches such
    # as the access log's it is also the faster encoder (docs/performance.md)
    line = "method=GET path=/caf\u00e9/\u65e5\u672c status=200 ms=0.3 \udcff"
    entries = [{"app": "a", "line": line, "proc": "router", "host": "h"}]
    frames = envelope.encode(envelope.make("log_batch", "h", entries=entries))
    assert frames[1].isascii()
    frames[1].decode("utf-8")
    assert envelope.decode(frames)["entries"] == entries


@pytest.mark.parametrize("frames,needle", [
    ([b"log"], "frames"),
    ([b"log", b"not json"], "not JSON"),
    ([b"log", b'{"v": 99, "type": "log", "app": "a", "line": "x"}'], "version"),
    ([b"route_tick", b'{"v": 1, "type": "log", "app": "a", "line": "x"}'], "topic"),
    ([b"log", b'{"v": 1, "type": "log", "app": "a"}'], "line"),
    ([b"nope", b'{"v": 1, "type": "nope"}'], "unknown"),
])
def test_decode_rejects_bad_frames(frames, needle):
    with pytest.raises(ProtocolError, match=needle):
        envelope.decode(frames)


def test_command_checks_declared_args():
    with pytest.raises(ProtocolError, match="lacks args"):
        envelope.command("stop")
    with pytest.raises(ProtocolError, match="unknown control action"):
        envelope.command("format-disk")
    cmd = envelope.command("stop", "c", instance="i1")
    rep = envelope.reply(cmd, "r", result={"x": 1})
    assert rep["re"] == cmd.id and rep["ok"] is True


def test_router_dealer_carry_identity_over_real_sockets():
    ctx = zmq.Context()
    try:
        router = channels.bind(ctx, "control", "tcp://127.0.0.1:*")
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        dealer = channels.connect(ctx, "control", endpoint, identity="runner-9")
        envelope.send(dealer, envelope.make("heartbeat", "runner-9", host="runner-9", interval=1.0))
        assert router.poll(5000)
        identity, msg = envelope.recv(router)
        assert identity == b"runner-9" and msg["host"] == "runner-9"
        envelope.send(router, envelope.command("stop", "c", instance="x"), identity)
        assert dealer.poll(5000)
        ident, cmd = envelope.recv(dealer)
        assert ident is None and cmd["action"] == "stop"
    finally:
        ctx.destroy(0)


@pytest.mark.filterwarnings("ignore:Using fork")       # eventlet, if another test loaded it
def test_ids_are_unique_in_a_process_and_after_fork():
    import os
    ids = {envelope.new_id() for _ in range(10000)}
    assert len(ids) == 10000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, envelope.new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    assert child not in ids and child[:8] != envelope.new_id()[:8]


def test_protocol_errors_always_say_what_to_do():
    with pytest.raises(ProtocolError) as err:
        envelope.decode([b"log"])
    assert "same Berth version" in err.value.hint
