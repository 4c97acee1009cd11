"""The frames of an attached run (CLI <-> controller) and the run shapes."""
import pytest

from messaging import runframes
from messaging.envelope import decode, encode, make, pack_bytes, unpack_bytes
from messaging.errors import ProtocolError
from messaging.shapes import HostReport, RunItem, State


def test_frames_split_however_the_bytes_arrive():
    data = (runframes.frame(runframes.STDIN, b"ls\r") + runframes.resize(132, 43)
            + runframes.signal("INT") + runframes.exit_frame(3, "exited with code 3"))
    reader = runframes.FrameReader()
    frames = [f for i in range(len(data)) for f in reader.feed(data[i:i + 1])]
    assert [k for k, _ in frames] == [runframes.STDIN, runframes.RESIZE,
                                      runframes.SIGNAL, runframes.EXIT]
    assert frames[0][1] == b"ls\r"
    assert runframes.parse_resize(frames[1][1]) == (132, 43)
    assert frames[2][1] == b"INT"
    assert runframes.parse_json(frames[3][1]) == {"code": 3, "reason": "exited with code 3"}
    assert reader.pending == 0


def test_bad_frames_are_refused():
    with pytest.raises(ProtocolError, match="kind"):
        runframes.FrameReader().feed(b"Z\0\0\0\0")
    with pytest.raises(ProtocolError, match="over"):
        runframes.FrameReader().feed(b"o\xff\xff\xff\xff")
    with pytest.raises(ProtocolError, match="cannot be sent"):
        runframes.signal("KILL")


def test_stream_bytes_travel_base64_in_messages():
    raw = bytes(range(256))
    msg = decode(encode(make("run_output", "r", run="x", data=pack_bytes(raw), stream="tty")))
    assert unpack_bytes(msg["data"]) == raw
    with pytest.raises(ProtocolError):
        unpack_bytes("not base64!")


def test_heartbeat_runs_are_run_items_apart_from_the_inventory():
    item = RunItem(run="ab12", app="a", release=3, command="bash", state=State.RUNNING,
                   tty=True, pid=42, since=1.5)
    report = HostReport.from_heartbeat({"host": "h1", "interval": 1.0, "inventory": [],
                                        "runs": [item.to_wire()]})
    assert report.inventory == [] and report.runs[0].host == "h1"
    assert report.runs[0].proc == "run.ab12" and report.runs[0].state is State.RUNNING
    with pytest.raises(ProtocolError):
        RunItem.from_wire({"run": "x", "state": "RUNNING"})
