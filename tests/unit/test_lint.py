"""The code stays as STYLE.md asks: ruff-clean everywhere, mypy-clean on the packages
whose types others build on."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["messaging", "config", "controller", "runner", "balancer", "cli", "settings_templates",
            "dbprovision", "backup"]
# balancer too: its core is compiled with mypyc, whose build fails on a type error (a
# changed messaging signature once left workers on pure Python without a word)
TYPED = ["messaging", "config", "controller", "cli", "settings_templates", "dbprovision",
         "backup", "balancer", "runner"]


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                          *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean():
    out = subprocess.run([sys.executable, "-m", "mypy", *TYPED], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


WIRE_SHAPE_LITERALS = [
    r'"backends"\s*:',                       # a route built by hand
    r'\{\s*"id"\s*:[^}]*"address"',          # a backend built by hand
    r'\{\s*"instance"\s*:[^}]*"state"',      # an inventory item built by hand
    r'"state"\s*:\s*"[A-Z]+"',               # a state spelled as a string
    r'\[\s*"state"\s*\]',                    # a state read as a string
    r'[=!]=\s*"(PENDING|PREPARING|STARTING|RUNNING|BACKOFF|STOPPING|FATAL|STOPPED|'
    r'DRAINING)"',
]


def test_wire_shapes_are_built_only_in_messaging():
    """Routes, backends, inventory items and states are messaging.shapes classes
    everywhere else, and states are compared through the enum."""
    import re
    offenders = []
    for package in PACKAGES:
        if package == "messaging":
            continue
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for pattern in WIRE_SHAPE_LITERALS:
                for m in re.finditer(pattern, text):
                    line = text.count("\n", 0, m.start()) + 1
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    assert not offenders, "\n".join(offenders)
