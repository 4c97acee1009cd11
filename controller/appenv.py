"""What the controller adds to an app's environment beyond its config vars.

- BERTH_HOSTNAMES: every name the balancer routes to the app (`<app>.<base_domain>`
  and its custom domains), comma-separated: the settings layers make Django's
  ALLOWED_HOSTS and Flask's TRUSTED_HOSTS of it. Instances learn it when they start,
  so adding or removing a domain makes a release (controller/store.py).
- The manifest's env aliases: ALIAS gets the value of the config var it names, unless
  the app set ALIAS itself.
- SECRET_KEY: made once, at the first deploy that finds a Django or Flask app, and
  kept in the app's config from then on (`berth config` shows and changes it; no
  other app ever sees it: config reaches only the app's own instances).
"""
from __future__ import annotations

import secrets
from typing import Any

from messaging.manifest import Manifest

HOSTNAMES = "BERTH_HOSTNAMES"
SECRET_KEY = "SECRET_KEY"
FRAMEWORKS = ("django", "flask")


def hostnames(app: str, base_domain: str, domains: list[str]) -> list[str]:
    return [f"{app}.{base_domain}", *domains]


def instance_env(config: dict[str, str], manifest: Manifest, names: list[str]
                 ) -> dict[str, str]:
    """The environment a start (or a build) carries: config, aliases, host names."""
    env = dict(config)
    for alias, source in manifest.env_aliases.items():
        if source in config and alias not in config:
            env[alias] = config[source]
    env[HOSTNAMES] = ",".join(names)
    return env


def with_secret_key(config: dict[str, str], detected: dict[str, Any] | None
                    ) -> tuple[dict[str, str], bool]:
    """The config with a SECRET_KEY added when the build found a framework that wants
    one and the app has none yet; and whether one was made."""
    if SECRET_KEY in config or (detected or {}).get("framework") not in FRAMEWORKS:
        return config, False
    return {**config, SECRET_KEY: secrets.token_urlsafe(50)}, True
