"""The app manifest: an optional `berth.yaml` beside the Procfile, parsed at upload.

    python: "3.12"              # one of the runners' interpreters (see `runner
                                #   interpreters`); an unknown one fails the build
    healthcheck: /healthz       # what the web health check asks for (default /)
    static:
      url: /static/             # URL prefix of static files (Django: STATIC_URL)
      dirs: [assets]            # more dirs of static files (Django: STATICFILES_DIRS)
    memory_mb: 256              # per-instance memory limit (`berth limits` wins)
    max_processes:              # most instances `berth scale` may ask per type
      web: 4
    env_aliases:                # more names for config vars: ALIAS: VAR
      DB_URL: DATABASE_URL
    settings_injection: off     # no Django/Flask settings layers (default on)

Every error names the file and the line (from yaml's marks) and says what is
allowed. The result is a messaging.manifest.Manifest, which travels as is.
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from controller.errors import Invalid
from controller.store import CONFIG_KEY, PROCESS_LIMITS, RESERVED_KEYS
from messaging.manifest import Manifest

FILE = "berth.yaml"
MAX_BYTES = 64 << 10
PYTHON = re.compile(r"^(?:python)?(3\.\d{1,2})$")
URL_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,199}$")
MAX_COUNT = 100
HINT = "the keys berth.yaml takes are in docs/architecture.md (\"Django and Flask apps\")"


def _fail(node: Node, problem: str, hint: str = HINT) -> Invalid:
    return Invalid(f"{FILE} line {node.start_mark.line + 1}: {problem}", hint)


def _scalar(node: Node, what: str) -> Any:
    if not isinstance(node, ScalarNode):
        raise _fail(node, f"{what} must be a single value, not a "
                          f"{'list' if isinstance(node, SequenceNode) else 'mapping'}")
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except ConstructorError as exc:
        raise _fail(node, f"{what}: {exc.problem}") from None


def _mapping(node: Node, what: str) -> list[tuple[str, Node, Node]]:
    """(key, key node, value node) of a mapping whose keys are strings, no repeats."""
    if not isinstance(node, MappingNode):
        raise _fail(node, f"{what} must be a mapping of `key: value` lines")
    seen: set[str] = set()
    out = []
    for key_node, value_node in node.value:
        key = _scalar(key_node, f"a key of {what}")
        if not isinstance(key, str):
            raise _fail(key_node, f"key {key!r} of {what} must be a name")
        if key in seen:
            raise _fail(key_node, f"{key} appears twice in {what}")
        seen.add(key)
        out.append((key, key_node, value_node))
    return out


def _python(node: Node, out: dict[str, Any]) -> None:
    # the raw text: YAML reads 3.10 as the number 3.1
    raw = node.value if isinstance(node, ScalarNode) else None
    m = PYTHON.match(str(raw).strip()) if raw is not None else None
    if m is None:
        raise _fail(node, f"python must be a version like 3.12, got {raw!r}",
                    "write `python: \"3.12\"`; the build lists the versions the runners have")
    out["python"] = m.group(1)


def _url_path(node: Node, what: str) -> str:
    value = _scalar(node, what)
    if not isinstance(value, str) or not URL_PATH.match(value):
        raise _fail(node, f"{what} must be a URL path starting with /, got {value!r}")
    return value


def _healthcheck(node: Node, out: dict[str, Any]) -> None:
    out["healthcheck"] = _url_path(node, "healthcheck")


def _static(node: Node, out: dict[str, Any]) -> None:
    for key, key_node, value in _mapping(node, "static"):
        if key == "url":
            url = _url_path(value, "static url")
            out["static_url"] = url if url.endswith("/") else url + "/"
        elif key == "dirs":
            if not isinstance(value, SequenceNode):
                raise _fail(value, "static dirs must be a list, e.g. [assets]")
            dirs = []
            for item in value.value:
                path = _scalar(item, "a static dir")
                if not isinstance(path, str) or not path or path.startswith("/") \
                        or ".." in path.split("/") or "\x00" in path:
                    raise _fail(item, f"static dir {path!r} must be a path inside the "
                                      "app, like assets or web/static")
                dirs.append(path.rstrip("/"))
            out["static_dirs"] = tuple(dirs)
        else:
            raise _fail(key_node, f"unknown key static.{key}", "static takes url and dirs")


def _memory(node: Node, out: dict[str, Any]) -> None:
    low, high = PROCESS_LIMITS["memory_mb"]
    value = _scalar(node, "memory_mb")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(node, f"memory_mb must be a whole number of MB from {low} to {high}, "
                          f"got {value!r}")
    out["memory_mb"] = value


def _max_processes(node: Node, out: dict[str, Any], procfile: dict[str, str]) -> None:
    maxima = {}
    for proc, key_node, value in _mapping(node, "max_processes"):
        if procfile and proc not in procfile:
            raise _fail(key_node, f"max_processes names {proc!r}, which the Procfile does "
                                  "not declare",
                        f"the Procfile declares: {', '.join(sorted(procfile))}")
        count = _scalar(value, f"max_processes.{proc}")
        if not isinstance(count, int) or isinstance(count, bool) \
                or not 0 <= count <= MAX_COUNT:
            raise _fail(value, f"max_processes.{proc} must be a count from 0 to "
                               f"{MAX_COUNT}, got {count!r}")
        maxima[proc] = count
    out["max_processes"] = maxima


def _env_aliases(node: Node, out: dict[str, Any]) -> None:
    aliases = {}
    for alias, key_node, value in _mapping(node, "env_aliases"):
        if not CONFIG_KEY.match(alias) or alias in RESERVED_KEYS \
                or alias.startswith("BERTH_"):
            raise _fail(key_node, f"env alias {alias!r} is not a name an app may set",
                        "use letters, digits and underscores; PORT, PATH, HOME and "
                        "BERTH_* are the platform's")
        source = _scalar(value, f"env_aliases.{alias}")
        if not isinstance(source, str) or not CONFIG_KEY.match(source):
            raise _fail(value, f"env_aliases.{alias} must name a config var, got "
                               f"{source!r}")
        aliases[alias] = source
    out["env_aliases"] = aliases


def _injection(node: Node, out: dict[str, Any]) -> None:
    value = _scalar(node, "settings_injection")
    if not isinstance(value, bool):
        raise _fail(node, f"settings_injection must be on or off, got {value!r}")
    out["settings_injection"] = value


def parse(text: bytes | str, procfile: dict[str, str] | None = None) -> Manifest:
    """A checked Manifest from the file's text; Invalid naming the line otherwise."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise Invalid(f"{FILE} is over {MAX_BYTES >> 10} KB",
                          "it holds a few settings; keep it short")
        text = text.decode("utf-8", errors="replace")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise Invalid(f"{FILE}{where}: not valid YAML: {exc.problem or exc.context}",
                      "check the indentation and quoting near that line") from None
    except yaml.YAMLError as exc:
        raise Invalid(f"{FILE}: not valid YAML: {exc}", HINT) from None
    if root is None:
        return Manifest()
    out: dict[str, Any] = {}
    for key, key_node, value in _mapping(root, FILE):
        if key == "max_processes":
            _max_processes(value, out, procfile or {})
        elif key in KEYS:
            KEYS[key](value, out)
        else:
            raise _fail(key_node, f"unknown key {key!r}",
                        f"{FILE} knows: {', '.join(sorted([*KEYS, 'max_processes']))}")
    return Manifest(**out)


KEYS = {"python": _python, "healthcheck": _healthcheck, "static": _static,
        "memory_mb": _memory, "env_aliases": _env_aliases,
        "settings_injection": _injection}
