#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# builds, and runs every test. `.ci/run` calls exactly this.
#
#   bash tests/run.sh            # everything CI runs
#   PLENUM_TIER=heavy bash tests/run.sh   # plus the heavier, hand-run variants
#
# Tests that need root or a kernel feature skip with a printed reason when run
# by hand without it, and fail when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

step() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - started ))"; }

step "system packages"
# nginx: the real reverse proxy of the reliability suite; iproute2: network
# namespaces for silent peers; curl: a second, independent HTTP client.
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "not root: cannot install ${need[*]}; the tests that need them will skip (or fail under CI=true)"
  fi
fi

step "format and lints"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

step "build"
cargo build --release --all-targets

step "unit tests, benches on tiny inputs"
cargo test --release --lib --bins
cargo test --release --benches

step "integration tests (one at a time: they share 2 cores and 20,000 files)"
cargo test --release --no-fail-fast --test '*' -- --test-threads=1

step "done"
echo "total $(( $(date +%s) - started ))s"
