#!/usr/bin/env bash
# Sourced by the project's commands: installs what the build and the local cluster need and
# exports CARGO_TARGET_DIR (outside the clone, so rebuilds on this machine are incremental),
# TANSU_BIN (the broker), SCHEMATHESIS_BIN (the API fuzzer), PLAYWRIGHT_CORE and CHROMIUM_BIN
# (the console's browser test).

export WALLET_CACHE_DIR="${WALLET_CACHE_DIR:-$HOME/.cache/wallet-platform}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WALLET_CACHE_DIR/target}"
mkdir -p "$WALLET_CACHE_DIR" "$CARGO_TARGET_DIR"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# libclang-dev: bindgen for RocksDB; postgresql: initdb/pg_ctl for the private test server;
# python3-venv: the environment of the API fuzzer; chromium (and Node.js with npm, unless
# installed some other way): the console's end-to-end test.
missing=()
for package in libclang-dev postgresql pkg-config g++ make python3-venv chromium; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

TANSU_BIN="$(scripts/install-broker.sh)"
export TANSU_BIN

SCHEMATHESIS_BIN="$(scripts/install-schemathesis.sh)"
export SCHEMATHESIS_BIN

PLAYWRIGHT_CORE="$(scripts/install-console-test.sh)"
export PLAYWRIGHT_CORE
export CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"
