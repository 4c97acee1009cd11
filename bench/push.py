"""How long a push takes: first push (virtualenv built) and a redeploy with unchanged
requirements (virtualenv reused), against the peer: plain `python -m venv` + `pip
install -r` of the same requirements. Run by hand:

    .venv/bin/python bench/push.py [--rounds 3]

It starts its own platform (controller, runner on 127.0.0.2, balancer) on free ports
with an empty virtualenv cache, times `berth push` end to end (pack, upload, build,
start, health check, route), and prints the medians and ratios. pip's own download
cache is warmed first so both sides install from the same local cache.
"""
from __future__ import annotations

import argparse
import os
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


def plain_pip(work: Path, n: int) -> float:
    venv = work / f"plain-{n}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "-r", str(EXAMPLE / "requirements.txt")],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    plain_pip(work, 0)                                   # warm pip's download cache
    results: dict[str, list[float]] = {"plain venv + pip install": [],
                                       "berth push, first (venv built)": [],
                                       "berth push, unchanged requirements": []}
    for n in range(rounds):
        results["plain venv + pip install"].append(plain_pip(work, n + 1))
        platform = LocalPlatform(work / f"platform-{n}", Ports.free(),
                                 runners=[("runner-1", "127.0.0.2")],
                                 venv_cache_dir=str(work / f"venvs-{n}"))
        platform.start()
        try:
            env = {**os.environ, "BERTH_CLI_API_URL": platform.api_url,
                   "BERTH_CLI_TOKEN": platform.admin_token,
                   "BERTH_CLI_CONFIG_DIR": str(work / "cli")}
            berth = [sys.executable, "-m", "cli.main"]
            subprocess.run([*berth, "apps", "create", "bench"], env=env, check=True,
                           capture_output=True, cwd=ROOT)
            app = work / f"app-{n}"
            shutil.copytree(EXAMPLE, app)
            results["berth push, first (venv built)"].append(
                timed([*berth, "push", str(app), "-a", "bench"], env=env, cwd=ROOT))
            (app / "app.py").write_text((app / "app.py").read_text() + "\n# changed\n")
            results["berth push, unchanged requirements"].append(
                timed([*berth, "push", str(app), "-a", "bench"], env=env, cwd=ROOT))
        finally:
            platform.stop()
    shutil.rmtree(work, ignore_errors=True)
    peer = statistics.median(results["plain venv + pip install"])
    print(f"{'what':40} {'median s':>9} {'min s':>7} {'vs plain pip':>13}")
    for what, times in results.items():
        med = statistics.median(times)
        print(f"{what:40} {med:9.2f} {min(times):7.2f} {med / peer:12.2f}x")
    print(f"({rounds} rounds; requirements: "
          f"{' '.join((EXAMPLE / 'requirements.txt').read_text().split())}; "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
