#!/usr/bin/env bash
# Set up, start the platform in the background, push the example app and curl it
# through the balancer. Stop it afterwards with: .venv/bin/berth down
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
BERTH=.venv/bin/berth
PORT=${BERTH_PORT:-8000}

if [ -f .berth-data/up.pid ] && kill -0 "$(cat .berth-data/up.pid)" 2>/dev/null; then
  echo "-----> Berth is already running (pid $(cat .berth-data/up.pid))"
else
  "$BERTH" up --detach --port "$PORT"
fi
"$BERTH" apps list --json | grep -q '"name": "hello"' || "$BERTH" apps create hello
"$BERTH" push examples/hello -a hello
echo "-----> Asking the balancer:"
echo "       curl -H 'Host: hello.localhost' http://127.0.0.1:$PORT/"
curl -sS --fail-with-body -H 'Host: hello.localhost' "http://127.0.0.1:$PORT/"
echo "-----> Done. Open http://hello.localhost:$PORT/ ; stop everything with: $BERTH down"
