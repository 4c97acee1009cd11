"""Declared settings.

A component declares a Spec of Settings in its settings.py; `Spec.load` reads the
component's section of a YAML file, then BERTH_<COMPONENT>_<NAME> environment
variables, then explicit overrides, and validates every value with an error that
names the setting and where it came from.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from messaging.errors import BerthError


class SettingsError(BerthError):
    code = "settings"


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str


class Spec:
    """All settings of one component."""

    def __init__(self, component: str, settings: list[Setting]) -> None:
        self.component = component
        self.settings = {s.name: s for s in settings}

    def env_name(self, name: str) -> str:
        return f"BERTH_{self.component.upper()}_{name.upper()}"

    def load(self, path: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None,
             **overrides: Any) -> SimpleNamespace:
        environ = os.environ if environ is None else environ
        values = {name: s.default for name, s in self.settings.items()}
        if path is not None:
            values.update(self._from_file(Path(path)))
        for name in self.settings:
            raw = environ.get(self.env_name(name))
            if raw is not None:
                values[name] = self._convert(name, raw, f"${self.env_name(name)}")
        for name, value in overrides.items():
            if name not in self.settings:
                raise SettingsError(f"unknown {self.component} setting {name!r}")
            if value is not None:
                values[name] = self._convert(name, value, "the command line")
        return SimpleNamespace(**values)

    def _from_file(self, path: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror}",
                                "check the path given with --config") from exc
        except yaml.YAMLError as exc:
            raise SettingsError(f"settings file {path} is not valid YAML: {exc}",
                                "fix the syntax at the line shown") from exc
        section = data.get(self.component, {}) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise SettingsError(f"section {self.component!r} of {path} is not a mapping",
                                f"write `{self.component}:` followed by indented keys")
        out = {}
        for name, raw in section.items():
            if name not in self.settings:
                known = ", ".join(sorted(self.settings))
                raise SettingsError(f"unknown setting {self.component}.{name} in {path}",
                                    f"known settings: {known}")
            out[name] = self._convert(name, raw, str(path))
        return out

    def _convert(self, name: str, raw: Any, source: str) -> Any:
        typ = self.settings[name].type
        try:
            if typ is bool and isinstance(raw, str):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                return low in ("1", "true", "yes", "on")
            if typ is list and isinstance(raw, str):
                return [part.strip() for part in raw.split(",") if part.strip()]
            if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
                return raw
            if typ in (int, float, str):
                return typ(raw)
            raise ValueError(raw)
        except (TypeError, ValueError) as exc:
            raise SettingsError(
                f"setting {self.component}.{name} from {source} must be a "
                f"{typ.__name__}, got {raw!r}",
                f"{self.settings[name].help}") from exc

    def describe(self) -> list[tuple[str, str, Any, str]]:
        """(name, env var, default, help) for docs and --help-settings."""
        return [(s.name, self.env_name(s.name), s.default, s.help)
                for s in self.settings.values()]
