"""Settings declared once (name, type, default, env var, help) and loaded from a
YAML file plus the environment, in the style of gunicorn's config.py; and the
key=value log format every daemon uses.
"""
from config.declare import Setting, SettingsError, Spec
from config.logfmt import setup_logging

__all__ = ["Setting", "SettingsError", "Spec", "setup_logging"]
