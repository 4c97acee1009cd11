"""Settings the platform injects into Django and Flask apps, in layers.

The code that runs inside an app's processes lives in `runtime/`, the one directory
the runner puts on an app's PYTHONPATH (read-only in its jail): the package
`berth_settings` there holds only the standard library, so nothing is added to the
app's virtualenv. See runtime/berth_settings/__init__.py for the layers and the
environment variables the runner and controller pass.
"""
from __future__ import annotations

from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
DJANGO_SETTINGS_MODULE = "berth_settings.django_settings"
FLASK_HOOK_MODULE = "berth_settings.flask_hook"
# written into a Flask app's virtualenv: at interpreter start, and only when the runner
# turned the layers on for the process, it installs the hook (no import otherwise)
FLASK_PTH_NAME = "berth_settings.pth"
FLASK_PTH_LINE = ("import os; os.environ.get('BERTH_FRAMEWORK') == 'flask' and "
                  f"__import__('{FLASK_HOOK_MODULE}').flask_hook.install()\n")
