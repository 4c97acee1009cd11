"""Static files: the platform's static file server against gunicorn, in the same run.
Run by hand (as root: the runner isolates the app), never from the test suite:

    .venv/bin/python bench/static.py [--duration 5] [--rounds 3] [--connections 20]
        [--wheel-cache DIR] [--only css] [--targets platform,gunicorn]

It starts its own platform (controller, a runner on 127.0.0.2, the balancer; free
ports, a temporary directory under /var/tmp), pushes an unedited `django-admin
startproject` (Procfile `web: gunicorn mysite.wsgi`: gunicorn's defaults, one sync
worker, as a newcomer deploys it), and runs wrk through the balancer against the same
collected files served two ways:

- platform: `/static/...`, which the balancer sends to the host's static file server
  (runner/static.py);
- gunicorn: `/st%61tic/...`, the same file: the balancer compares the raw path with
  the static prefix, so it sends it to the app, where Django decodes it to
  `/static/...` and the stopgap middleware (berth_settings.static, Django's `serve`)
  answers from the same STATIC_ROOT. This is what every static request cost before
  the platform served them (and what a request costs when no static server answers).

and, to see where the time goes, both servers without the balancer (static-direct,
gunicorn-direct). Cases: `css` (admin/css/base.css, 22 kB: kept in memory by the
static server), `js` (admin/js/vendor/jquery/jquery.js, 285 kB: sendfile), `css-304`
(a revalidation with If-Modified-Since: a 304 without a body).

Every target and case runs --rounds times, interleaved (so a change in the machine's
load hits all of them alike). Printed per target and case, medians over the rounds:
req/s, p50/p99 latency, errors (summed), and the CPU time of the serving processes per
request (the balancer's and the runner's process trees, which hold the static server
and gunicorn; wrk excluded), then the platform's ratios to gunicorn. wrk, the
platform and the app share this machine's cores: the figures compare on one machine,
they are not capacities. Bounded: every wrk run has a timeout and the whole run stops
after --max-seconds. The app is destroyed and every process started here stopped (by
PID, through LocalPlatform) at the end.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.localplatform import LocalPlatform, Ports  # noqa: E402

APP = "djstatic"
HOST = f"{APP}.localhost"
RUNNER_ADDRESS = "127.0.0.2"
FILES = {"css": "admin/css/base.css", "js": "admin/js/vendor/jquery/jquery.js",
         "css-304": "admin/css/base.css"}
TARGETS = ("platform", "gunicorn", "static-direct", "gunicorn-direct")
DJANGO_REQUIREMENTS = "Django>=4.2,<6\ngunicorn>=23\n"


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us: float = float("nan")

    UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}

    @classmethod
    def parse(cls, out: str) -> Result:
        def latency(pct: str) -> float:
            m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
            return float(m.group(1)) * cls.UNITS[m.group(2)] if m else float("nan")
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        reqs = re.search(r"(\d+) requests in", out)
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors += int(non2xx.group(1)) if non2xx else 0
        if rps is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        return cls(float(rps.group(1)), latency("50"), latency("99"),
                   int(reqs.group(1)) if reqs else 0, errors)


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds (user + system) of `roots` and every descendant still alive."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    wanted, total = set(roots), 0.0
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    for pid in wanted:
        total += stats.get(pid, (0, 0.0))[1]
    return total


def fetch(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wrk(url: str, headers: dict[str, str], args: argparse.Namespace, duration: float,
        cpu_roots: list[int]) -> Result:
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
           "--timeout", "5s"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    cpu0 = tree_cpu(cpu_roots)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    cpu = tree_cpu(cpu_roots) - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")
    result = Result.parse(done.stdout)
    result.cpu_us = 1e6 * cpu / result.requests if result.requests else float("nan")
    return result


def cli(platform: LocalPlatform, work: Path, *args: str, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BERTH_CLI_API_URL": platform.api_url,
           "BERTH_CLI_TOKEN": platform.admin_token, "BERTH_CLI_CONFIG_DIR": str(work / "cli")}
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"berth {' '.join(args)}: {done.stdout}{done.stderr}")
    return done


def django_project(work: Path, cache: Path) -> Path:
    lib = work / "django-lib"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(lib),
                    "--disable-pip-version-check", "--find-links", str(cache),
                    "Django>=4.2,<6"], check=True, capture_output=True, timeout=300)
    dest = work / "mysite"
    dest.mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(dest)],
                   check=True, env={**os.environ, "PYTHONPATH": str(lib)}, timeout=60)
    (dest / "requirements.txt").write_text(DJANGO_REQUIREMENTS)
    (dest / "Procfile").write_text("web: gunicorn mysite.wsgi\n")
    return dest


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return (f"{os.cpu_count()} cores ({cpu}), kernel {os.uname().release}, Python "
            f"{sys.version.split()[0]} ({sys.executable}), "
            f"{version.splitlines()[0].strip() if version else 'wrk'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded seconds first")
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of every target and case, interleaved; medians are shown")
    p.add_argument("--only", action="append", choices=sorted(FILES), help="case(s) to run")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--wheel-cache", default=os.environ.get("BERTH_TEST_VENV_CACHE", ""),
                   help="shared wheel cache to reuse (default: a fresh one; Django's "
                        "wheels are then fetched from the index)")
    p.add_argument("--max-seconds", type=int, default=900, help="the whole run's bound")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def _expired(signum: int, frame: object) -> None:
    raise TimeoutError("bench/static.py ran past --max-seconds")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the runner isolates the app", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("-----> installing wrk with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "wrk"],
                       check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    signal.signal(signal.SIGALRM, _expired)
    signal.alarm(args.max_seconds)
    targets = [t for t in args.targets.split(",") if t]
    cases = args.only or list(FILES)
    started = time.monotonic()
    # not under /tmp (every jail has its own); parents traversable by the app's user
    work = Path(tempfile.mkdtemp(prefix="berth-bench-static-", dir="/var/tmp"))
    work.chmod(0o711)
    cache = Path(args.wheel_cache) if args.wheel_cache else work / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    platform = LocalPlatform(work / "platform", Ports.free(),
                             runners=[("runner-1", RUNNER_ADDRESS)],
                             wheel_cache_dir=str(cache), apps_dir=str(work / "apps"))
    results: dict[tuple[str, str], Result] = {}
    try:
        project = django_project(work, cache)
        platform.start()
        cli(platform, work, "apps", "create", APP)
        print(f"-----> pushing an unedited Django project ({time.monotonic() - started:.0f}s)",
              flush=True)
        cli(platform, work, "push", str(project), "-a", APP)
        bal = platform.ports.balancer
        hosts = json.loads(cli(platform, work, "hosts", "--json").stdout)["runners"]
        static_port = hosts["runner-1"]["static_port"]
        ps = json.loads(cli(platform, work, "ps", "-a", APP, "--json").stdout)
        web = next(i for i in ps["instances"] if i["proc"] == "web" and i["state"] == "RUNNING")
        release = web["release"]
        cpu_roots = [p.pid for name, p in platform.procs.items()
                     if name.startswith(("balancer", "runner"))]
        urls = {
            "platform": (f"http://127.0.0.1:{bal}/static/", {"Host": HOST}),
            "gunicorn": (f"http://127.0.0.1:{bal}/st%61tic/", {"Host": HOST}),
            "static-direct": (f"http://{RUNNER_ADDRESS}:{static_port}/static/",
                              {"Host": HOST, "X-Berth-Static": f"{APP} /static/ {release}"}),
            "gunicorn-direct": (f"http://{web['address']}:{web['port']}/static/",
                                {"Host": HOST}),
        }
        # the same bytes both ways, each from the server it should come from
        deadline = time.monotonic() + 30
        while True:
            _, h, body = fetch(bal, f"/static/{FILES['css']}", {"Host": HOST})
            if h.get("Server") == "berth-static" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for name in cases:
            path = FILES[name]
            _, hp, bp = fetch(bal, f"/static/{path}", {"Host": HOST})
            _, hg, bg = fetch(bal, f"/st%61tic/{path}", {"Host": HOST})
            assert hp.get("Server") == "berth-static", hp
            assert hg.get("Server", "").startswith("gunicorn"), hg
            assert bp == bg and len(bp) > 1000, (len(bp), len(bg))
        last_modified = hp["Last-Modified"]
        print(f"-----> measuring ({time.monotonic() - started:.0f}s): "
              f"wrk -t1 -c{args.connections} -d{args.duration:g}s", flush=True)
        runs: dict[tuple[str, str], list[Result]] = {}
        for n in range(args.rounds):            # interleaved: load drift hits all alike
            for name in cases:
                for target in targets:
                    base, headers = urls[target]
                    if name == "css-304":
                        headers = {**headers, "If-Modified-Since": last_modified}
                    url = base + FILES[name]
                    if args.warmup:
                        wrk(url, headers, args, args.warmup, cpu_roots)
                    r = wrk(url, headers, args, args.duration, cpu_roots)
                    runs.setdefault((target, name), []).append(r)
                    print(f"       round {n + 1} {target:16} {name:8} {r.rps:9.0f} req/s  "
                          f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
                          f"errors {r.errors}  load {os.getloadavg()[0]:.1f}", flush=True)
        for key, rs in runs.items():
            results[key] = Result(median([r.rps for r in rs]), median([r.p50_ms for r in rs]),
                                  median([r.p99_ms for r in rs]), sum(r.requests for r in rs),
                                  sum(r.errors for r in rs), median([r.cpu_us for r in rs]))
        cli(platform, work, "apps", "destroy", APP, "--confirm", APP)
        deadline = time.monotonic() + 60
        while any((work / "apps" / "runner-1").glob("*")) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        signal.alarm(0)
        platform.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| target | case | req/s | p50 ms | p99 ms | server CPU µs/req | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in cases:
        for target in targets:
            r = results[(target, name)]
            print(f"| {target} | {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                  f"{r.cpu_us:,.0f} | {r.errors} |")
    if "platform" in targets and "gunicorn" in targets:
        print()
        print("| case | req/s platform/gunicorn | p50 gunicorn/platform | "
              "p99 gunicorn/platform | CPU/req gunicorn/platform |")
        print("|---|---:|---:|---:|---:|")
        for name in cases:
            p, g = results[("platform", name)], results[("gunicorn", name)]
            print(f"| {name} | {p.rps / g.rps:.2f} | {g.p50_ms / p.p50_ms:.2f} | "
                  f"{g.p99_ms / p.p99_ms:.2f} | {g.cpu_us / p.cpu_us:.2f} |")
    print()
    print(f"({machine()}; load average {os.getloadavg()[0]:.2f} at the end; "
          f"{time.monotonic() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
