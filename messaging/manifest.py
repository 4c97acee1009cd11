"""The app manifest as it travels: what an app's optional `berth.yaml` (beside its
Procfile) asks of the platform, once the controller has parsed and checked it at
upload (controller/manifest.py). Stored with the build and its releases, carried to
runners in `prepare` and `start` commands.

On the wire it is a JSON object of the fields below; `from_wire` keeps what it knows
(a newer peer may add fields) and refuses fields of the wrong type.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from messaging.errors import ProtocolError


@dataclass(frozen=True)
class Manifest:
    python: str | None = None           # "3.12": which of the runners' interpreters
    healthcheck: str = "/"              # path the web health check asks for
    static_url: str | None = None       # URL prefix of static files (Django: STATIC_URL)
    static_dirs: tuple[str, ...] = ()   # more dirs of static files, relative to the app
    memory_mb: int | None = None        # per-instance memory (`berth limits` wins)
    max_processes: dict[str, int] = field(default_factory=dict)   # most per type
    env_aliases: dict[str, str] = field(default_factory=dict)     # alias -> source var
    settings_injection: bool = True     # Django/Flask settings layers (settings_templates)

    def to_wire(self) -> dict[str, Any]:
        return {"python": self.python, "healthcheck": self.healthcheck,
                "static_url": self.static_url, "static_dirs": list(self.static_dirs),
                "memory_mb": self.memory_mb, "max_processes": dict(self.max_processes),
                "env_aliases": dict(self.env_aliases),
                "settings_injection": self.settings_injection}

    @classmethod
    def from_wire(cls, data: Any) -> Manifest:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ProtocolError("a manifest is not a JSON object")
        kept = {k: v for k, v in data.items() if k in _FIELDS and v is not None}
        for name, kind in (("python", str), ("healthcheck", str), ("static_url", str),
                           ("settings_injection", bool)):
            if name in kept and not isinstance(kept[name], kind):
                raise ProtocolError(f"manifest field {name} must be {kind.__name__}")
        if "memory_mb" in kept and not _positive(kept["memory_mb"]):
            raise ProtocolError("manifest field memory_mb must be a positive integer")
        dirs = kept.get("static_dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ProtocolError("manifest field static_dirs must be a list of strings")
        kept["static_dirs"] = tuple(dirs)
        maxima = kept.get("max_processes", {})
        if not isinstance(maxima, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for v in maxima.values()):
            raise ProtocolError("manifest field max_processes must map process types "
                                "to counts")
        aliases = kept.get("env_aliases", {})
        if not isinstance(aliases, dict) or not all(
                isinstance(v, str) for v in aliases.values()):
            raise ProtocolError("manifest field env_aliases must map names to names")
        return cls(**kept)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_FIELDS = frozenset(f.name for f in fields(Manifest))
