#!/usr/bin/env bash
# Installs what the test suite needs besides the Rust toolchain. Idempotent: anything
# already present is left alone. Needs root for Debian packages (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
