#!/usr/bin/env bash
# Installs playwright-core (drives the system Chromium in the console's end-to-end test) from npm
# into the cache directory, once. Prints the path of the installed package.
set -euo pipefail
cache="${WALLET_CACHE_DIR:-$HOME/.cache/wallet-platform}"
version=1.65.1
root="$cache/playwright-core-$version"
package="$root/node_modules/playwright-core"
if [ ! -f "$package/package.json" ]; then
  echo "installing playwright-core $version into $root (once)" >&2
  rm -rf "$root"
  mkdir -p "$root"
  echo '{"private": true}' > "$root/package.json"
  (cd "$root" && npm install --silent --no-audit --no-fund "playwright-core@$version" >&2)
fi
echo "$package"
