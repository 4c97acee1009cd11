"""A hostile tenant: every endpoint attempts something another tenant or the platform
must not allow, and reports the OS's answer (errno name) instead of hiding it."""
import errno
import os
import socket
import time

from flask import Flask, jsonify, request

app = Flask(__name__)


def outcome(action):
    try:
        value = action()
    except OSError as exc:
        return jsonify({"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)),
                        "error": str(exc)})
    return jsonify({"ok": True, "value": value})


@app.route("/read")
def read():
    path = request.args["path"]
    return outcome(lambda: open(path, "rb").read(200).decode(errors="replace"))


@app.route("/list")
def listdir():
    return outcome(lambda: sorted(os.listdir(request.args["path"]))[:50])


@app.route("/write")
def write():
    path = request.args["path"]

    def attempt():
        with open(path, "w") as fh:
            fh.write("pwned by attacker\n")
        return path
    return outcome(attempt)


@app.route("/connect")
def connect():
    host, port = request.args["host"], int(request.args["port"])

    def attempt():
        with socket.create_connection((host, port), timeout=3):
            return f"{host}:{port}"
    return outcome(attempt)


@app.route("/whoami")
def whoami():
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return jsonify({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                    "pids": pids, "data_dir": os.environ.get("BERTH_DATA_DIR"),
                    "env_keys": sorted(os.environ)})


@app.route("/alloc")
def alloc():
    """Touch every page of N MB: past the memory limit the kernel kills this worker."""
    block = bytearray(int(request.args["mb"]) << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return jsonify({"allocated_mb": len(block) >> 20})


@app.route("/forkbomb")
def forkbomb():
    """Fork until refused, bounded to `tries` forks and `seconds`; every child sleeps a
    little and exits, so the bomb ends by itself."""
    tries, seconds = int(request.args.get("tries", 400)), float(request.args.get("seconds", 10))
    forked = refused = 0
    deadline = time.monotonic() + seconds
    children = []
    while forked + refused < tries and time.monotonic() < deadline:
        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            refused += 1
            time.sleep(0.001)
            continue
        if pid == 0:
            time.sleep(3)
            os._exit(0)
        forked += 1
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return jsonify({"forked": forked, "refused": refused})
