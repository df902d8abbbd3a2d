#!/usr/bin/env bash
# The whole test suite.
# 1. Deployment gates: cfn-lint and `sam validate --lint` on template.yaml (and
#    cfn-lint on waf.yaml), the policy check (and its own tests), and `sam build` of
#    every function for arm64 (cargo-lambda + zig), reporting the binary sizes
#    (SKIP_SAM_BUILD=1 skips it).
# 2. A local DynamoDB-compatible server (moto, pinned, from PyPI) on a free loopback
#    port; every Rust test (the store conformance suite against both stores, the
#    Lambda wiring tests), each micro-benchmark once, then the black-box HTTP tests
#    again on DynamoDB.
# Tools come from PyPI at pinned versions; the server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/payfence-target}"
export SAM_CLI_TELEMETRY=0
MOTO_VERSION=5.2.1
SAM_VERSION=1.170.0
CFN_LINT_VERSION=1.58.0
CARGO_LAMBDA_VERSION=1.9.2

need() { # module-or-command version pip-spec
  # Not `grep -q`: it stops reading at the match, pip then dies of SIGPIPE, and with
  # pipefail that looked like a missing package, reinstalled on every run.
  if ! python3 -m pip show "$1" 2>/dev/null | grep -x "Version: $2" >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check "$3"
  fi
}
need moto "$MOTO_VERSION" "moto[server]==$MOTO_VERSION"
need aws-sam-cli "$SAM_VERSION" "aws-sam-cli==$SAM_VERSION"
need cfn-lint "$CFN_LINT_VERSION" "cfn-lint==$CFN_LINT_VERSION"
need cargo-lambda "$CARGO_LAMBDA_VERSION" "cargo-lambda==$CARGO_LAMBDA_VERSION"

echo "== deployment gates"
cfn-lint template.yaml waf.yaml
sam validate --lint
python3 scripts/policy_check.py
python3 -m unittest scripts/test_policy.py scripts/test_signing_doc.py
if [ "${SKIP_SAM_BUILD:-0}" != 1 ]; then
  rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1 || true
  # cargo-lambda builds in the clone's own target/ (where SAM picks the binaries up).
  env -u CARGO_TARGET_DIR sam build --beta-features
  echo "arm64 Lambda binaries:"
  for f in .aws-sam/build/*Function/bootstrap; do
    size=$(stat -c %s "$f")
    awk -v n="$(basename "$(dirname "$f")")" -v s="$size" 'BEGIN { printf "  %-20s %6.1f MB\n", n, s / 1e6 }'
    [ "$size" -le 12000000 ] || { echo "  over the 12 MB budget"; exit 1; }
  done
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
# The criterion micro-benchmarks, each run once as a test (they measure only under
# `cargo bench`).
cargo test --workspace --bench decision --bench signing
PAYFENCE_TEST_STORE=dynamodb cargo test -p payfence-local --test proxy --test authorize --test concurrency --test dashboard --test random_input
