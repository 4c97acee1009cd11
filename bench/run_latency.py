"""What a one-off run costs (`berth run`), measured end to end. Run by hand, as root
(the runner isolates each app):

    .venv/bin/python bench/run_latency.py [--rounds 20]

It starts its own platform (controller, runner on 127.0.0.2, balancer) on free ports,
pushes examples/hello, then times, each `--rounds` times (median, min, max):
  - the CLI alone: `berth --version` (Python start-up and imports);
  - `berth run --no-tty -- true`: CLI start, POST, placement, the runner's prepare with
    the release unpacked and its venv warm, jail + cgroup + spawn, exit back, as a
    user waits for it;
  - the same minus the CLI's own start-up (the run's cost on the platform);
  - a keystroke's echo in an attached terminal (`berth run cat` through a real pty):
    key -> CLI -> controller -> runner -> pty -> echo -> back;
and the throughput of output: `head -c 64M /dev/zero` through `berth run --no-tty`
(credit window messaging.messages.RUN_WINDOW per run).
"""
from __future__ import annotations

import argparse
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.localplatform import LocalPlatform, Ports  # noqa: E402

EXAMPLE = ROOT / "examples" / "hello"


def timed(args: list[str], **kw: object) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start


def echo_times(berth: list[str], env: dict[str, str], rounds: int) -> list[float]:
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [*berth, "run", "-a", "hello", "cat"], env)
    out = b""

    def wait_for(needle: bytes, timeout: float = 60.0) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while needle not in out:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r} in {out[-300:]!r}")
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 65536)
    times = []
    try:
        os.write(fd, b"ready\r")
        wait_for(b"ready\r\nready")             # echoed, then cat's own copy
        for i in range(rounds):
            key = b"%c" % (ord("a") + i % 26)
            out = b""
            start = time.perf_counter()
            os.write(fd, key)
            wait_for(key)
            times.append(time.perf_counter() - start)
        os.write(fd, b"\x04\x04")               # EOF to cat
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="berth-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    platform = LocalPlatform(work / "platform", Ports.free(),
                             runners=[("runner-1", "127.0.0.2")],
                             wheel_cache_dir=str(work / "wheels"),
                             apps_dir=str(work / "apps"))
    results: dict[str, list[float]] = {}
    platform.start()
    try:
        env = {**os.environ, "BERTH_CLI_API_URL": platform.api_url,
               "BERTH_CLI_TOKEN": platform.admin_token,
               "BERTH_CLI_CONFIG_DIR": str(work / "cli"), "TERM": "xterm"}
        berth = [sys.executable, "-m", "cli.main"]
        kw = {"env": env, "cwd": ROOT}
        subprocess.run([*berth, "apps", "create", "hello"], check=True, capture_output=True,
                       **kw)  # type: ignore[call-overload]
        subprocess.run([*berth, "push", str(EXAMPLE), "-a", "hello"], check=True,
                       capture_output=True, **kw)  # type: ignore[call-overload]
        run = [*berth, "run", "--no-tty", "-a", "hello", "--", "true"]
        timed(run, input=b"", **kw)             # the runner unpacks and reuses once
        results["berth --version (CLI start-up)"] = [
            timed([*berth, "--version"], **kw) for _ in range(rounds)]
        results["berth run --no-tty -- true"] = [
            timed(run, input=b"", **kw) for _ in range(rounds)]
        cli = statistics.median(results["berth --version (CLI start-up)"])
        results["  of which the platform (minus CLI)"] = [
            t - cli for t in results["berth run --no-tty -- true"]]
        results["keystroke echo, attached terminal"] = echo_times(berth, env, rounds)
        size = 64 << 20
        start = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            subprocess.run([*berth, "run", "--no-tty", "-a", "hello", "--",
                            f"head -c {size} /dev/zero"], check=True, stdout=sink,
                           input=b"", **kw)  # type: ignore[call-overload]
        took = time.perf_counter() - start
    finally:
        platform.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'what':40} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for what, times in results.items():
        print(f"{what:40} {statistics.median(times) * 1000:10.1f} "
              f"{min(times) * 1000:8.1f} {max(times) * 1000:8.1f}")
    print(f"output throughput: {size / took / 1e6:.0f} MB/s "
          f"({size >> 20} MiB in {took:.2f}s, CLI start included)")
    print(f"({rounds} rounds; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
