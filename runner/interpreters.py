"""The Python interpreters this runner makes app virtualenvs from.

An app asks for one by version in its berth.yaml (`python: "3.12"`); without it the
runner setting `python` is used. The runner knows the interpreter of `python`, those
listed in the setting `interpreters`, and every `python3.N` in /usr/bin and
/usr/local/bin; each is asked its version once. Asking for one the runner lacks fails
the build with the list of those it has.
"""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from runner.errors import BuildError, RunnerError
from runner.venv import python_version

log = logging.getLogger(__name__)

SEARCH_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))
FILE_NAME = re.compile(r"^python3\.\d+$")


def short_version(full: str) -> str:
    """`3.11` of `cpython-3.11.2`."""
    return ".".join(full.rsplit("-", 1)[-1].split(".")[:2])


class Interpreters:
    def __init__(self, default: str, extra: list[str],
                 search: tuple[Path, ...] = SEARCH_DIRS) -> None:
        self.default = default
        self.extra = list(extra)
        self.search = search
        self._found: dict[str, str] | None = None
        self._lock = threading.Lock()

    def available(self) -> dict[str, str]:
        """version ("3.11") -> interpreter path; the default's version is the default."""
        with self._lock:
            if self._found is None:
                found: dict[str, str] = {}
                candidates = [self.default, *self.extra]
                for directory in self.search:
                    if directory.is_dir():
                        candidates += sorted(str(p) for p in directory.iterdir()
                                             if FILE_NAME.match(p.name))
                for path in candidates:
                    try:
                        found.setdefault(short_version(python_version(path)), path)
                    except RunnerError as exc:
                        if path != self.default:
                            log.warning("interpreter unusable", extra={
                                "python": path, "error": exc.message})
                self._found = found
            return dict(self._found)

    def pick(self, wanted: str | None) -> str:
        """The interpreter for a manifest's `python` (None: the runner's default)."""
        if wanted is None:
            return self.default
        found = self.available()
        if wanted in found:
            return found[wanted]
        have = ", ".join(f"python{v}" for v in sorted(found, key=_order)) or "none"
        raise BuildError(f"berth.yaml asks for python {wanted}, which this runner does not "
                         f"have; it has: {have}",
                         "set `python:` in berth.yaml to one of those, or remove it to get "
                         "the runner's default")


def _order(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())
