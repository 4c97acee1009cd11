"""berth_settings runs inside apps, found through PYTHONPATH: the tests find it the
same way."""
from __future__ import annotations

import sys

from settings_templates import RUNTIME_DIR

if str(RUNTIME_DIR) not in sys.path:
    sys.path.insert(0, str(RUNTIME_DIR))
