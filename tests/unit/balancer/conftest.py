"""BERTH_TEST_NATIVE=1 runs these tests on the mypyc-compiled core
(balancer/native.py), as tests/integration/test_balancer_native.py does."""
from __future__ import annotations

import os

if os.environ.get("BERTH_TEST_NATIVE") == "1":
    from balancer import native

    if not native.enable():
        raise RuntimeError(f"BERTH_TEST_NATIVE=1 but no native build in "
                           f"{native.build_dir()} for these sources")
