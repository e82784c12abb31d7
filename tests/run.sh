#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, builds,
# runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build"
cargo build --release --bins
echo "== tests"
cargo test --release -- --test-threads=1
