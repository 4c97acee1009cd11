"""DJANGO_SETTINGS_MODULE of a Django project on Berth (when injection is on).

It loads the project's own settings module (BERTH_DJANGO_SETTINGS, detected at build
from manage.py or wsgi.py) as `from <module> import *` would, then applies the
platform's layers on top (berth_settings.layers). The project's files are not
touched: the runner sets DJANGO_SETTINGS_MODULE to this module, and manage.py and
wsgi.py only `setdefault` it.
"""
from __future__ import annotations

import importlib as _importlib
import os as _os

from berth_settings import layers as _layers

_ORIGINAL = _os.environ.get("BERTH_DJANGO_SETTINGS", "")
if not _ORIGINAL:
    raise ImportError("BERTH_DJANGO_SETTINGS names no settings module: Berth sets it "
                      "with DJANGO_SETTINGS_MODULE; set BERTH_SETTINGS_INJECTION=off to "
                      "run the project with its own settings")
_own = _importlib.import_module(_ORIGINAL)
_names = getattr(_own, "__all__", None) or [n for n in vars(_own) if not n.startswith("_")]
globals().update({n: getattr(_own, n) for n in _names})
_layers.apply(globals(), "django", _os.environ)
