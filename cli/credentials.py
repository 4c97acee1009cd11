"""Where the CLI finds the API URL and token: env overrides, else the saved login."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cli.settings import SPEC
from messaging.errors import BerthError


@dataclass
class Credentials:
    api_url: str
    token: str


def path() -> Path:
    return Path(SPEC.load().config_dir) / "credentials.json"


def save(api_url: str, token: str) -> Path:
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"api_url": api_url.rstrip("/"), "token": token}, fh)
    return p


def load() -> Credentials:
    s = SPEC.load()
    saved: dict[str, str] = {}
    if path().exists():
        try:
            saved = json.loads(path().read_text())
        except ValueError as exc:
            raise BerthError(f"{path()} is not valid JSON", "run `berth login` again") from exc
    api_url = s.api_url or saved.get("api_url", "")
    token = s.token or saved.get("token", "")
    if not api_url or not token:
        raise BerthError("you are not logged in",
                         "run `berth up` to start a local platform, or `berth login --api "
                         "URL --token TOKEN`", code="unauthorized", status=401)
    return Credentials(api_url.rstrip("/"), token)
