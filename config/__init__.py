"""Settings declared once (name, type, default, env var, allowed values, help) and
loaded from a YAML file plus the environment, in the style of gunicorn's config.py;
the table every component's settings print as (describe.py); the one error
reporter of the daemons (report.py); and the key=value log format every daemon uses.
"""
from config.declare import Invalid, Setting, SettingsError, Spec
from config.logfmt import setup_logging
from config.report import report, reporting

__all__ = ["Invalid", "Setting", "SettingsError", "Spec", "report", "reporting",
           "setup_logging"]
