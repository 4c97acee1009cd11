"""The balancer's per-request core compiled with mypyc, for speed
(docs/performance.md: about half the Python time per request).

`python -m balancer.native build` compiles MODULES (the sans-IO parsing and
decisions, the exchange, and the asyncio engine's streams) with mypyc into a
directory named by a fingerprint of their sources and the interpreter, under
BERTH_NATIVE_DIR (default ~/.cache/berth/balancer-native). A worker with
`native: true` (the default) uses that build when one exists for the very sources
it runs, and the pure Python modules otherwise, so an edited module is never
shadowed by a stale build; the start log line says which. Building needs mypy
(the test extra), a C compiler and the Python headers; running needs none of them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import balancer

MODULES = ("http1", "admission", "routes", "pool", "stats", "exchange", "aio")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def fingerprint() -> str:
    digest = hashlib.sha256(sys.implementation.cache_tag.encode() + SUFFIX.encode())
    for name in MODULES:
        digest.update(name.encode() + b"\0" + (HERE / f"{name}.py").read_bytes())
    return digest.hexdigest()[:20]


def build_dir() -> Path:
    base = os.environ.get("BERTH_NATIVE_DIR") or \
        str(Path.home() / ".cache" / "berth" / "balancer-native")
    return Path(base) / fingerprint()


def built(path: Path | None = None) -> bool:
    path = path or build_dir()
    return all((path / "balancer" / f"{name}{SUFFIX}").is_file() for name in MODULES)


def enable() -> bool:
    """Import the compiled modules from now on, when built for these sources;
    False (pure Python) otherwise, or when one of them is imported already."""
    path = build_dir()
    if any(f"balancer.{name}" in sys.modules for name in MODULES) or not built(path):
        return False
    sys.path.insert(0, str(path))                     # mypyc's shared runtime module
    balancer.__path__.insert(0, str(path / "balancer"))
    return True


def active() -> bool:
    module = sys.modules.get("balancer.exchange")
    return bool(module and (module.__file__ or "").endswith(SUFFIX))


_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, target, out, temp = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
setup(name="berth-balancer-native", ext_modules=mypycify(paths, opt_level="3",
      target_dir=target), script_args=["build_ext", "--build-lib", out,
      "--build-temp", temp])
"""


def build() -> Path:
    """Compile MODULES; returns the build directory (already there: nothing done)."""
    path = build_dir()
    if built(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="berth-native-") as tmp:
        out = Path(tmp) / "out"
        paths = ",".join(f"balancer/{name}.py" for name in MODULES)
        done = subprocess.run([sys.executable, "-c", _SETUP, paths, f"{tmp}/c", str(out),
                               f"{tmp}/o"], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mypyc failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        staged = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        shutil.copytree(out, staged, dirs_exist_ok=True)
        try:
            staged.rename(path)
        except OSError:           # built meanwhile by another process
            shutil.rmtree(staged, ignore_errors=True)
    if not built(path):
        raise RuntimeError(f"mypyc left no module for every one of {MODULES} in {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["build"], ["where"]):
        print("usage: python -m balancer.native build|where", file=sys.stderr)
        return 2
    if args == ["where"]:
        print(f"{build_dir()} ({'built' if built() else 'not built'})")
        return 0
    try:
        path = build()
    except (RuntimeError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        print("Hint: building needs mypy (pip install mypy), a C compiler and the "
              "Python headers; without a build the balancer runs its pure Python "
              "modules", file=sys.stderr)
        return 1
    print(f"-----> balancer core compiled in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
