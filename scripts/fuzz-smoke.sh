#!/usr/bin/env bash
# Runs every cargo-fuzz target for a few seconds (stable toolchain, no sanitizer),
# starting from the committed seed corpora. New inputs go to a temporary directory, so
# the committed corpora are not changed. Exit non-zero on the first crash.
#   SECONDS_PER_TARGET=600 bash scripts/fuzz-smoke.sh   # a longer run
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
per_target="${SECONDS_PER_TARGET:-5}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cargo fuzz build -s none
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${per_target}s"
    cargo fuzz run -s none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$per_target" -rss_limit_mb=4096 -print_final_stats=0 2>&1 | tail -n 3
done
echo "fuzz: every target ran ${per_target}s without a crash"
