#!/usr/bin/env bash
# Runs one cargo-fuzz target (fuzz/fuzz_targets) for a while: scripts/fuzz.sh TARGET [SECONDS].
# Targets: command, snapshot, event, raft_message.
# Needs the nightly toolchain; installs cargo-fuzz from crates.io when it is missing. The first
# build compiles every dependency (RocksDB included) again with nightly: expect 20-30 minutes.
# Crashes and the corpus stay under fuzz/artifacts and fuzz/corpus (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}"
seconds="${2:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
cd fuzz
cargo +nightly fuzz run "$target" \
    --target-dir "${HOME}/.cache/wallet-platform/fuzz-target" \
    -- -max_total_time="$seconds"
