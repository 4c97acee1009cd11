"""The order settings are applied in, once the app's own are loaded (later wins):

    platform base  ->  per-host file  ->  the app's own overrides from its config

`apply(namespace, framework, env)` runs the three on a mapping of settings: a
Django settings module's globals, or a Flask app's config.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from berth_settings import django_base, flask_base

Settings = MutableMapping[str, Any]

BASES: dict[str, Callable[[Settings, Mapping[str, str]], None]] = {
    "django": django_base.apply,
    "flask": flask_base.apply,
}
PREFIXES = {"django": "DJANGO_", "flask": "FLASK_"}
# DJANGO_* variables Django itself reads; they name no setting
NOT_SETTINGS = {"SETTINGS_MODULE", "ALLOW_ASYNC_UNSAFE", "COLORS", "WATCHMAN_TIMEOUT"}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class SettingsLayerError(RuntimeError):
    """A layer could not be applied; says which one and what to change."""


def apply(settings: Settings, framework: str, env: Mapping[str, str]) -> None:
    if framework not in BASES:
        raise SettingsLayerError(f"no settings layers for framework {framework!r}")
    BASES[framework](settings, env)
    host_layer(settings, framework, env)
    app_layer(settings, framework, env)


def host_layer(settings: Settings, framework: str, env: Mapping[str, str]) -> None:
    """`<BERTH_SETTINGS_HOST_DIR>/<framework>.py`, when the operator keeps one: Python
    run with the settings so far as its globals (and `env`); the UPPERCASE names it
    leaves are the settings."""
    directory = env.get("BERTH_SETTINGS_HOST_DIR")
    if not directory:
        return
    path = os.path.join(directory, f"{framework}.py")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        code = compile(fh.read(), path, "exec")
    scope: dict[str, Any] = {k: v for k, v in settings.items() if k.isupper()}
    scope.update({"__file__": path, "__name__": "berth_host_settings", "env": env})
    try:
        exec(code, scope)
    except Exception as exc:
        raise SettingsLayerError(f"the per-host settings file {path} failed: {exc!r}") \
            from exc
    settings.update({k: v for k, v in scope.items() if k.isupper()})


def app_layer(settings: Settings, framework: str, env: Mapping[str, str]) -> None:
    """Config vars DJANGO_<NAME> (Django) or FLASK_<NAME> (Flask) set setting <NAME>,
    as Flask's `from_prefixed_env` does: the value as JSON when it parses, else the
    string; a setting that is a boolean so far takes on/off words too."""
    prefix = PREFIXES[framework]
    for key in sorted(env):
        if not key.startswith(prefix) or key == prefix:
            continue
        name = key[len(prefix):]
        if framework == "django" and name in NOT_SETTINGS:
            continue
        settings[name] = typed(env[key], settings.get(name))


def typed(raw: str, current: Any) -> Any:
    if isinstance(current, bool):
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    try:
        return json.loads(raw)
    except ValueError:
        return raw
