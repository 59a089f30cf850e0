#!/usr/bin/env bash
# Installs the Kafka-compatible broker (Tansu 0.6.0 from crates.io) into a cache directory
# outside the clone, once. Prints the path of the broker binary.
set -euo pipefail
cache="${WALLET_CACHE_DIR:-$HOME/.cache/wallet-platform}"
root="$cache/tansu-0.6.0"
bin="$root/bin/tansu"
if [ ! -x "$bin" ]; then
  echo "installing the Tansu 0.6.0 broker into $root (about 10 minutes, once)" >&2
  CARGO_TARGET_DIR="$cache/tansu-build" cargo install tansu --version 0.6.0 --locked \
    --features dynostore --root "$root" >&2
  rm -rf "$cache/tansu-build"
fi
echo "$bin"
