#!/usr/bin/env bash
# Runs the platform: a complete local cluster with its data under ./.wallet (topology group,
# 2 storage shards and 2 coordinator shards of 3 replicas each, a private PostgreSQL server unless
# DATABASE_URL is set, and the REST gateway on 127.0.0.1:8080). Prints the gateway URL and an
# API key; Ctrl-C stops everything; running it again resumes from ./.wallet.
# Extra arguments go to `walletctl up` (see `walletctl up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --workspace --bins
exec "$CARGO_TARGET_DIR/debug/walletctl" up --data-dir .wallet "$@"
