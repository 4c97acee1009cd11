"""key=value logs that name the component, host and, where known, app and release.

Pass context with `extra={"app": ..., "release": ...}`; every extra field is
appended as key=value.
"""
from __future__ import annotations

import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def __init__(self, component: str, host: str) -> None:
        super().__init__()
        self.component = component
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"component={self.component}", f"host={_quote(self.host)}",
                 f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(component: str, host: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(component, host))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
