#!/usr/bin/env bash
# The whole test suite. Starts a local DynamoDB-compatible server (moto, pinned,
# from PyPI) on a free loopback port, runs every test (the store conformance suite
# against both stores), then the black-box proxy, authorize and concurrency tests
# again on DynamoDB. Stops the server on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/payfence-target}"
MOTO_VERSION=5.2.1

if ! python3 -c "import sys, moto; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG="${TMPDIR:-/tmp}/payfence-moto-$PORT.log"
python3 scripts/moto_server.py 127.0.0.1 "$PORT" >"$LOG" 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 150); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  kill -0 "$MOTO_PID" 2>/dev/null || { echo "moto server failed to start:"; cat "$LOG"; exit 1; }
  sleep 0.2
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || { echo "moto server not reachable on $PORT"; exit 1; }

export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
# The emulator is far slower than DynamoDB: give it time (defaults: 1 s / 3 s).
export PAYFENCE_DYNAMODB_ATTEMPT_TIMEOUT_MS=10000 PAYFENCE_DYNAMODB_TIMEOUT_MS=30000
export PAYFENCE_TEST_DYNAMODB="http://127.0.0.1:$PORT"

cargo test --workspace
PAYFENCE_TEST_STORE=dynamodb cargo test -p payfence-local --test proxy --test authorize --test concurrency --test dashboard
