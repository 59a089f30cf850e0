#!/usr/bin/env bash
# The whole test suite, with all set-up on a fresh Debian machine: installs the Debian packages
# the build and the tests need when they are missing, installs the Kafka-compatible broker when it
# is missing, builds the workspace and runs every test against real PostgreSQL and a real broker.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# Service binaries are started by the integration tests, so build them first.
cargo build --workspace --bins
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
