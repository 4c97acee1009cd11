#!/usr/bin/env bash
# Set up and run the whole test suite (unit, integration with real processes, e2e).
#
# With no arguments the suite runs as two pytest processes side by side, which halves
# the wall time on two cores (most tests wait on real processes rather than compute):
# the unit tests with the integration tests that start no runner (the balancer's, the
# database provisioner's, the API server's and the locks'; no app users, firewall or
# cgroups: nothing the other half touches), and everything else. Each
# picks its ports from its own range (BERTH_CLI_PORT_RANGE), so they never collide. With
# arguments it is one plain `pytest ARGS`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
first=(tests/unit tests/integration/test_balancer.py tests/integration/test_balancer_limits.py
       tests/integration/test_balancer_replication.py tests/integration/test_balancer_master.py
       tests/integration/test_balancer_native.py tests/integration/test_dbprovision_ha.py
       tests/integration/test_dbprovision_pgdedicated.py
       tests/integration/test_dbprovision_pgshared.py
       tests/integration/test_dbprovision_redis.py
       tests/integration/test_dbprovision_service.py
       tests/integration/test_api_server.py tests/integration/test_locks.py)
rest=()
for path in "${first[@]}"; do rest+=(--ignore "$path"); done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
BERTH_CLI_PORT_RANGE=20000-25999 .venv/bin/python -m pytest -p no:cacheprovider "${first[@]}" \
    > "$log" 2>&1 &
first_pid=$!
set +e
BERTH_CLI_PORT_RANGE=26000-31999 .venv/bin/python -m pytest "${rest[@]}"
rest_status=$?
wait "$first_pid"
first_status=$?
set -e
echo
echo "======== unit tests and the integration tests without runners (run beside the rest) ========"
cat "$log"
if [ "$first_status" -ne 0 ] || [ "$rest_status" -ne 0 ]; then
    echo "FAILED: the first half (unit, no-runner integration) exited $first_status, the rest $rest_status" >&2
    exit 1
fi
echo "both halves passed"
