#!/usr/bin/env bash
# Installs schemathesis (the schema-driven API fuzzer the gateway tests run against
# /openapi.json) from PyPI into a virtual environment in the cache directory, once. Prints the
# path of its command.
set -euo pipefail
cache="${WALLET_CACHE_DIR:-$HOME/.cache/wallet-platform}"
version=4.32.5
root="$cache/schemathesis-$version"
bin="$root/bin/schemathesis"
if [ ! -x "$bin" ]; then
  echo "installing schemathesis $version into $root (once)" >&2
  rm -rf "$root"
  python3 -m venv "$root" >&2
  "$root/bin/pip" install --quiet "schemathesis==$version" >&2
fi
echo "$bin"
