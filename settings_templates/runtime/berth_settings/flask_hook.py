"""Settings for Flask apps, applied as each `Flask(...)` is made.

The runner writes a one-line `.pth` file (settings_templates.FLASK_PTH_LINE) into
the app's virtualenv when Flask is in it; at interpreter start, and only when
BERTH_FRAMEWORK is `flask`, that line calls `install()`, which watches for
`flask.app` being imported and wraps `Flask.make_config`: every new app's config
gets the platform's layers (berth_settings.layers) before the app's own code (its
factory) configures it further. Nothing is imported early: processes that never
import Flask pay nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


def patch(flask_app: ModuleType) -> None:
    cls = flask_app.Flask
    if getattr(cls, "_berth_settings", False):
        return
    original = cls.make_config

    def make_config(self: Any, instance_relative: bool = False) -> Any:
        from berth_settings import layers

        config = original(self, instance_relative)
        layers.apply(config, "flask", os.environ)
        return config

    cls.make_config = make_config
    cls._berth_settings = True


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> Any:
        if fullname != "flask.app":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if "flask.app" in sys.modules:
        patch(sys.modules["flask.app"])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
