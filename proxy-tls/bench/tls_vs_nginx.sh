#!/usr/bin/env bash
# Side by side on loopback, same certificate: TLS handshakes per second and HTTPS
# keep-alive throughput (HTTP/1.1 and HTTP/2) of proxy-tls's acceptor versus nginx.
#
# Needs: nginx, h2load (Debian: apt-get install -y nginx nghttp2-client), openssl.
# Bounded: every client run has a fixed request count and a time limit; only 127.0.0.1.
# BIN=path/to/tls_hello to reuse a build; otherwise it is built in release mode here.
# SECONDS_PER_RUN (default 5), REQUESTS (default 20000), CONNS (default 20).
set -euo pipefail

for tool in nginx h2load openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y nginx nghttp2-client openssl" >&2; exit 1; }
done
SECS=${SECONDS_PER_RUN:-5}
N=${REQUESTS:-20000}
C=${CONNS:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

if [[ -z "${BIN:-}" ]]; then
  cargo build --release -q -p proxy-tls --example tls_hello --manifest-path "$ROOT/Cargo.toml"
  BIN="$ROOT/target/release/examples/tls_hello"
fi

# One ECDSA P-256 certificate for both servers.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OURS=$(port); NGX=$(port)

"$BIN" "127.0.0.1:$OURS" "$WORK/cert.pem" "$WORK/key.pem" >/dev/null &
PIDS+=($!)

mkdir -p "$WORK/nginx"
# `listen ... ssl http2` rather than `http2 on;`: the latter needs nginx 1.25+ (Debian 12 has 1.22).
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:$NGX ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location / { return 200 "hello\n"; }
  }
}
CONF
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" &
PIDS+=($!)

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }
wait_port "$OURS"; wait_port "$NGX"

handshakes() { # full handshakes per second, one client, TLS 1.3
  timeout $((SECS + 10)) openssl s_time -connect "127.0.0.1:$1" -new -time "$SECS" 2>/dev/null \
    | awk '/real seconds/ && $4 > 0 {printf "%.0f\n", $1 / $4; exit}'
}
reqs() { # requests per second over keep-alive connections
  timeout $((SECS * 6 + 10)) h2load -n "$N" -c "$C" "$@" 2>/dev/null | awk '/^finished in/ {print $4}' | tr -d ,
}

printf '%-34s %14s %14s\n' "" "proxy-tls" "nginx"
printf '%-34s %14s %14s\n' "TLS handshakes/s (1 client)" "$(handshakes "$OURS")" "$(handshakes "$NGX")"
printf '%-34s %14s %14s\n' "HTTPS HTTP/1.1 keep-alive req/s" \
  "$(reqs --h1 "https://localhost:$OURS/")" "$(reqs --h1 "https://localhost:$NGX/")"
printf '%-34s %14s %14s\n' "HTTPS HTTP/2 (10 streams) req/s" \
  "$(reqs -m 10 "https://localhost:$OURS/")" "$(reqs -m 10 "https://localhost:$NGX/")"
