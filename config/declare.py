"""Declared settings.

A component declares a Spec of Settings in its settings.py; `Spec.load` reads the
component's section of a YAML file, then BERTH_<COMPONENT>_<NAME> environment
variables, then explicit overrides, and validates every value with an error that
names the setting, where it came from, the bad value and what to do.

A Setting may restrict its values beyond the type:
- `choices`: the only values allowed (strings compare case-insensitively and are
  stored as declared);
- `min` / `max`: bounds, inclusive, for numbers;
- `check`: a callable taking the converted value that raises `Invalid` (or
  ValueError) with the problem, or returns the problem as a string (None: fine).
  config/checks.py holds the common ones.
A Spec may also take `checks` across settings (callables of the loaded namespace
raising Invalid), for example "app_uid_min is not above app_uid_max".

Defaults are not validated at load (an empty default often means "derive it");
tests/unit/config checks that every declared default passes its own rules.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from messaging.errors import BerthError


class SettingsError(BerthError):
    code = "settings"
    default_hint = "see every setting with `berth settings` or `python -m <component> " \
                   "--help-settings`"


class Invalid(ValueError):
    """Raised by a check: what is wrong with the value, and optionally what to do."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


Check = Callable[[Any], Any]     # a problem string, or None (anything else: fine)

TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
              list: "a list (YAML list, or comma-separated in an env var)"}


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    check: Check | None = None
    min: float | None = None
    max: float | None = None

    def allowed(self) -> str:
        """What values are allowed beyond the type, in words ("" when any)."""
        if self.choices:
            return ", ".join(str(c) for c in self.choices)
        parts = []
        if self.min is not None and self.max is not None:
            parts.append(f"{_num(self.min)}..{_num(self.max)}")
        elif self.min is not None:
            parts.append(f">= {_num(self.min)}")
        elif self.max is not None:
            parts.append(f"<= {_num(self.max)}")
        rule = getattr(self.check, "rule", "")
        if rule:
            parts.append(rule)
        return "; ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def describe_check(rule: str) -> Callable[[Check], Check]:
    """Give a check a short description for `berth settings` (its `rule`)."""
    def mark(fn: Check) -> Check:
        fn.rule = rule  # type: ignore[attr-defined]
        return fn
    return mark


class Spec:
    """All settings of one component."""

    def __init__(self, component: str, settings: list[Setting],
                 checks: Iterable[Callable[[SimpleNamespace], None]] = ()) -> None:
        self.component = component
        self.settings = {s.name: s for s in settings}
        self.checks = list(checks)

    def env_name(self, name: str) -> str:
        return f"BERTH_{self.component.upper()}_{name.upper()}"

    def load(self, path: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None,
             **overrides: Any) -> SimpleNamespace:
        environ = os.environ if environ is None else environ
        values = {name: _copy(s.default) for name, s in self.settings.items()}
        if path is not None:
            values.update(self._from_file(Path(path)))
        for name in self.settings:
            raw = environ.get(self.env_name(name))
            if raw is not None:
                values[name] = self._convert(name, raw, f"${self.env_name(name)}")
        for name, value in overrides.items():
            if name not in self.settings:
                raise SettingsError(f"unknown {self.component} setting {name!r}",
                                    f"known settings: {', '.join(sorted(self.settings))}")
            if value is not None:
                values[name] = self._convert(name, value, "the command line")
        loaded = SimpleNamespace(**values)
        for check in self.checks:
            try:
                check(loaded)
            except Invalid as exc:
                raise SettingsError(f"{self.component} settings: {exc.problem}",
                                    exc.hint) from exc
        return loaded

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
        setting = self.settings[name]
        typ = setting.type
        if typ is str and isinstance(raw, bool) and {"on", "off"} <= set(setting.choices):
            raw = "on" if raw else "off"        # YAML reads a bare on/off as a boolean
        try:
            value = _to_type(typ, raw)
        except (TypeError, ValueError) as exc:
            word = TYPE_WORDS.get(typ, typ.__name__)
            example = f", e.g. {setting.default!r}" if setting.default not in ("", []) else ""
            raise SettingsError(
                f"setting {self.component}.{name} from {source} must be {word}, got {raw!r}",
                f"write {word}{example}. {setting.help}") from exc
        return self._validate(setting, value, raw, source)

    def _validate(self, setting: Setting, value: Any, raw: Any, source: str) -> Any:
        where = f"setting {self.component}.{setting.name} from {source}"
        if setting.choices:
            for choice in setting.choices:
                if choice == value or (isinstance(value, str) and isinstance(choice, str)
                                       and choice.lower() == value.strip().lower()):
                    return choice
            listed = ", ".join(str(c) for c in setting.choices)
            raise SettingsError(f"{where} must be one of {listed}, got {raw!r}",
                                f"choose one of {listed}. {setting.help}")
        if setting.min is not None and value < setting.min \
                or setting.max is not None and value > setting.max:
            if setting.min is not None and setting.max is not None:
                bound = f"from {_num(setting.min)} to {_num(setting.max)}"
            elif setting.min is not None:
                bound = f"at least {_num(setting.min)}"
            else:
                bound = f"at most {_num(setting.max)}"    # type: ignore[arg-type]
            raise SettingsError(f"{where} must be {bound}, got {raw!r}",
                                f"use a value {bound}. {setting.help}")
        if setting.check is not None:
            hint = ""
            try:
                problem = setting.check(value)
            except Invalid as exc:
                problem, hint = exc.problem, exc.hint
            except ValueError as exc:
                problem = str(exc)
            if isinstance(problem, str) and problem:
                raise SettingsError(f"{where} {problem}, got {raw!r}",
                                    hint or setting.help)
        return value

    def describe(self) -> list[dict[str, Any]]:
        """Every setting as name, env, type, default, allowed, help: for
        `berth settings` and --help-settings (config/describe.py prints them)."""
        return [{"name": s.name, "env": self.env_name(s.name), "type": s.type.__name__,
                 "default": s.default, "allowed": s.allowed(), "help": s.help}
                for s in self.settings.values()]


def _to_type(typ: type, raw: Any) -> Any:
    if typ is bool and isinstance(raw, str):
        low = raw.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return low in ("1", "true", "yes", "on")
    if typ is list and isinstance(raw, str):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    if typ is float and isinstance(raw, bool):
        raise ValueError(raw)
    if typ in (int, float) and isinstance(raw, str):
        return typ(raw.strip())
    if typ is float and isinstance(raw, int):
        return float(raw)
    if typ is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if typ is str and isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(raw)
    raise ValueError(raw)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
