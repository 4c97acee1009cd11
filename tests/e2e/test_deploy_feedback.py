"""A release that cannot start is reported at its first crash, with its traceback,
and the Procfile runs through a shell as on Heroku."""
from __future__ import annotations

import json
import time

from tests.e2e.conftest import copy_example

CRASHING = ("import os\nfrom flask import Flask\n"
            "raise RuntimeError('berth-crash-marker: ' + os.environ['BERTH_APP'])\n"
            "app = Flask(__name__)\n")


def test_a_crash_on_start_is_reported_at_once_with_its_traceback(berth, tmp_path):
    berth("apps", "create", "crashy")
    app = copy_example(tmp_path / "crashy")
    # a Procfile line that only works through a shell: an assignment and $PORT
    (app / "Procfile").write_text(
        "web: GREETING=from-procfile gunicorn app:app --env PORT_SEEN=$PORT\n")
    (app / "app.py").write_text(
        "import os\nfrom flask import Flask\napp = Flask(__name__)\n\n\n"
        "@app.route('/')\ndef index():\n"
        "    same = os.environ['PORT_SEEN'] == os.environ['PORT']\n"
        "    return os.environ['GREETING'] + (' port-expanded' if same else ' no-port')\n")
    berth("push", str(app), "-a", "crashy")
    r = berth.wait_for(lambda: (lambda r: r.status == 200 and r)(berth.get("crashy")),
                       what="v1 served through the balancer")
    assert r.text == "from-procfile port-expanded"

    (app / "app.py").write_text(CRASHING)
    started = time.monotonic()
    out = berth("push", str(app), "-a", "crashy", check=False)
    took = time.monotonic() - started
    assert out.returncode != 0
    assert "crashed on start" in out.stderr and "release v2" in out.stderr
    assert "RuntimeError: berth-crash-marker: crashy" in out.stderr      # the traceback
    assert "v1 keeps serving" in out.stderr
    # reported at the first crash, not after every retry: the platform is still
    # retrying v2 (not FATAL yet) when the CLI has already said why
    ps = json.loads(berth("ps", "-a", "crashy", "--json").stdout)
    v2 = [i for i in ps["instances"] if i["release"] == 2]
    assert v2 and all(i["state"] != "FATAL" for i in v2), v2
    print(f"push of a crashing release answered in {took:.1f}s")
    assert berth.get("crashy").text == "from-procfile port-expanded"


def test_a_first_release_that_crashes_says_nothing_else_serves(berth, tmp_path):
    berth("apps", "create", "crashfirst")
    app = copy_example(tmp_path / "crashfirst")
    (app / "app.py").write_text(CRASHING)
    out = berth("push", str(app), "-a", "crashfirst", check=False)
    assert out.returncode != 0
    assert "RuntimeError: berth-crash-marker: crashfirst" in out.stderr
    assert "nothing else is serving the app" in out.stderr
    assert "keeps serving" not in out.stderr


RELEASE_SCRIPT = """import os, sys
print('release-phase-ran for', os.environ['BERTH_APP'], 'with', os.environ.get('MARK', '-'))
sys.exit(int(os.environ.get('RELEASE_EXIT', '0')))
"""


def test_the_release_phase_runs_once_before_the_release_and_a_failure_keeps_the_old(
        berth, tmp_path):
    berth("apps", "create", "phased")
    app = copy_example(tmp_path / "phased")
    (app / "release.py").write_text(RELEASE_SCRIPT)
    (app / "Procfile").write_text("web: gunicorn app:app\n"
                                  "release: MARK=first python release.py\n")
    out = berth("push", str(app), "-a", "phased")
    assert out.stdout.count("release-phase-ran for phased with first") == 1, out.stdout
    assert "Running release command" in out.stdout and "Deployed phased v1" in out.stdout
    berth.wait_for(lambda: berth.get("phased").status == 200, what="v1 serving")
    v1_body = berth.get("phased").text

    # release is not a process type
    refused = berth("scale", "release=1", "-a", "phased", check=False)
    assert refused.returncode != 0 and "not a process type" in refused.stderr

    # a failing release command: no v2, v1 keeps serving, its output is shown
    (app / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n\n\n"
                                "@app.route('/')\ndef index():\n    return 'v2 must not serve'\n")
    (app / "Procfile").write_text("web: gunicorn app:app\n"
                                  "release: MARK=second RELEASE_EXIT=3 python release.py\n")
    out = berth("push", str(app), "-a", "phased", check=False)
    assert out.returncode != 0
    shown = out.stdout + out.stderr
    assert "release-phase-ran for phased with second" in shown
    assert "exited with code 3" in shown and "release v1 keeps serving" in shown
    listing = berth("releases", "-a", "phased").stdout
    assert "v1" in listing and "v2" not in listing, listing
    for _ in range(5):
        assert berth.get("phased").text == v1_body
