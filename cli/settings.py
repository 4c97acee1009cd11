"""CLI settings, declared once (environment only: BERTH_CLI_*); `berth settings`
lists them with every daemon's."""
from __future__ import annotations

import os
from pathlib import Path

from config import Setting, Spec
from config.checks import http_url_or_empty, port_range, positive

SPEC = Spec("cli", [
    Setting("config_dir", str, str(Path(os.path.expanduser("~")) / ".config" / "berth"),
            "Where `berth login` and `berth up` keep the API URL and token."),
    Setting("api_url", str, "", "Controller API URL; overrides the saved login.", check=http_url_or_empty),
    Setting("token", str, "", "API token; overrides the saved login."),
    Setting("deploy_timeout", float, 300.0, "Seconds `berth push` waits for the release to run.", check=positive),
    Setting("port_range", str, "20000-32000", "Ports `berth up` and the test platforms pick for their daemons (low-high, below the kernel's ephemeral range, from which an outgoing connection could take one between the pick and the bind); scripts/test.sh gives each of its two pytest processes its own.", check=port_range),
])
