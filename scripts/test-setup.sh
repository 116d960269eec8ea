#!/usr/bin/env bash
# Installs what the test suite needs besides the Rust toolchain. Idempotent: anything
# already present is left alone. Needs root for Debian packages (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# cargo-fuzz, for the short fuzzing run of every target (scripts/fuzz-smoke.sh).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Python environment for the FastAPI end-to-end test (examples/fastapi).
if [ ! -x .venv/bin/uvicorn ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r examples/fastapi/requirements.txt
fi

# Pebble, the ACME test server, for proxy-tls's end-to-end certificate test.
if ! command -v pebble >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble >/dev/null
fi

# redis-server, for the rate-limit zone shared through Redis (proxy-core/tests/limit_redis.rs).
if ! command -v redis-server >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# The openssl command line, the OCSP responder of proxy-tls's stapling test
# (proxy-tls/tests/ocsp.rs).
if ! command -v openssl >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

# Let a closing SO_REUSEPORT listener hand its queued connections to the other processes
# on the port (Linux >= 5.14), for the graceful-restart test of two instances. Best effort:
# the test reports honestly when the kernel or the sandbox does not allow it.
sysctl -qw net.ipv4.tcp_migrate_req=1 2>/dev/null || true
