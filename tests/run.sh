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

step "fuzz the request path (time-boxed)"
# The committed corpus was already replayed above (tests/fuzz_corpus.rs); this
# searches for new inputs for ${PLENUM_FUZZ_SECS:-60} s (600 s in the heavy tier),
# into a scratch corpus so fuzz/corpus/request stays as committed. cargo-fuzz
# passes nightly-only flags (-Zsanitizer=address, sanitizer coverage) that a
# stable rustc accepts with RUSTC_BOOTSTRAP=1. Skipped, with a line saying so,
# only if cargo-fuzz cannot be installed; a crash fails the run.
if [ "${PLENUM_TIER:-}" = heavy ]; then fuzz_secs=${PLENUM_FUZZ_SECS:-600}; else fuzz_secs=${PLENUM_FUZZ_SECS:-60}; fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  timeout 900 cargo install cargo-fuzz --locked >/dev/null 2>&1 || true
fi
if cargo fuzz --version >/dev/null 2>&1; then
  scratch=$(mktemp -d)
  fuzz_log=$(mktemp)
  if RUSTC_BOOTSTRAP=1 cargo fuzz run request "$scratch" fuzz/corpus/request -- \
      -max_total_time="$fuzz_secs" -print_final_stats=1 >"$fuzz_log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$fuzz_log" || tail -n 5 "$fuzz_log"
  else
    tail -n 80 "$fuzz_log"
    echo "fuzzing found a failure: the input is in fuzz/artifacts/request/"
    exit 1
  fi
  rm -rf "$scratch" "$fuzz_log"
else
  echo "SKIP fuzzing: cargo-fuzz cannot be installed here (the corpus replay still ran)"
fi

step "done"
echo "total $(( $(date +%s) - started ))s"
