"""CLI settings, declared once (environment only: BERTH_CLI_*); `berth settings`
lists them with every daemon's."""
from __future__ import annotations

import os
from pathlib import Path

from config import Setting, Spec
from config.checks import http_url_or_empty, positive

SPEC = Spec("cli", [
    Setting("config_dir", str, str(Path(os.path.expanduser("~")) / ".config" / "berth"),
            "Where `berth login` and `berth up` keep the API URL and token."),
    Setting("api_url", str, "", "Controller API URL; overrides the saved login.", check=http_url_or_empty),
    Setting("token", str, "", "API token; overrides the saved login."),
    Setting("deploy_timeout", float, 300.0, "Seconds `berth push` waits for the release to run.", check=positive),
])
