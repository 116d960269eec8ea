#!/usr/bin/env python3
"""Side-by-side load comparison of our proxy and nginx, on loopback, in one interleaved run.

What it needs (it installs nothing):
    apt-get install -y nginx wrk openssl python3 util-linux   # taskset is in util-linux
    apt-get install -y valgrind nghttp2-client                # only for --callgrind
and a Rust toolchain to build the proxy in release mode (or PROXY_BIN / TLS_PROXY_BIN).

What it does:
  * starts a fast upstream (an nginx instance serving a small body and a 64 KiB one),
  * starts our proxy (`proxy run`, one worker thread) and nginx (one worker process) with
    equivalent configs: upstream keep-alive 32, access logs off, keepalive_requests
    100000, one plain and one HTTPS listener (ours: a second `[[server]]` with
    `tls = { certificate, key }` and the defaults otherwise, as nginx's `listen ... ssl`
    with only `ssl_certificate`/`ssl_certificate_key`/`ssl_protocols`; both send two
    TLS 1.3 session tickets per handshake; TLS_SIDE=example measures the load_tls_proxy
    example instead, proxy-tls's stack without the binary's layers),
  * pins both proxies to CPU 0 and wrk, the upstream and the idle/slowloris clients to CPU 1,
  * runs each scenario for a bounded time, ours and nginx back to back, ROUNDS times
    (who goes first alternates; the table has the medians, and the ratio row the median
    of each round's own ratio):
      small     small keep-alive responses
      64k       64 KiB keep-alive responses
      newconn   a new connection per request (Connection: close)
      tls       HTTPS keep-alive
      tlsnew    HTTPS, a new connection (full TLS 1.3 handshake) per request
      idle      5,000 idle keep-alive client connections held open (memory per connection)
      slowloris 1,000 connections sending one header byte per second beside the small load
  * prints one markdown table: requests/s, the proxy's own CPU time per request (utime +
    stime from /proc), p50, p99 and peak RSS (VmHWM, reset before each scenario), and the
    ratio ours/nginx.

  --callgrind  instead counts user-space instructions per small keep-alive request with
               valgrind's callgrind for both (counts are stable; wall-clock is not).
  --callgrind newconn
               the same for a new connection per request: a client opens a connection,
               sends one small request with `Connection: close`, reads to EOF, and again,
               CALLGRIND_CONNS times (2000) after a 200-connection warm-up.
  --callgrind tlsnew
               the same over HTTPS, a TLS 1.3 handshake per request (Python's ssl, that
               is OpenSSL as wrk). Like wrk, each connection resumes the previous one's
               session by ticket (PSK with a new X25519 exchange: no certificate, no
               signature); CALLGRIND_TLS_RESUME=0 makes every handshake a full one
               (ECDSA P-256 signature). Under valgrind ring picks its generic x25519
               code (no ADX) and OpenSSL its own paths: compare with care.

Everything listens on 127.0.0.1 only, every client run is bounded in time, and every
process it started is stopped when it ends. Environment: DURATION (seconds per run, 5),
ROUNDS (runs of each load scenario per server, 3; idle runs once),
CONNS (wrk connections, 50), IDLE_CONNS (5000), IDLE_SETTLE (seconds between the last
idle connection's response and the memory reading, 1.5), IDLE_SETTLE_MAX (the longest
wait, 30, for the resident size to stop falling: the `idle (settled)` row), SLOW_CONNS (1000), PROXY_CPU (0),
LOAD_CPU (1), WORKERS (1), SCENARIOS (comma list, default all), CALLGRIND_REQUESTS (20000),
CALLGRIND_CONNS (2000, for --callgrind newconn), CALLGRIND_CLIENTS (1),
CALLGRIND_TLS_RESUME (1), TLS_SIDE (binary or example), CALLGRIND_MALLOC_CONF (our jemalloc's options under callgrind: no purging, so counts
do not depend on wall time),
OURS_PRELOAD / OURS_MALLOC_CONF (run our proxy with another allocator, e.g.
/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 and dirty_decay_ms:0).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DURATION = int(os.environ.get("DURATION", "5"))
CONNS = int(os.environ.get("CONNS", "50"))
IDLE_CONNS = int(os.environ.get("IDLE_CONNS", "5000"))
SLOW_CONNS = int(os.environ.get("SLOW_CONNS", "1000"))
IDLE_SETTLE = float(os.environ.get("IDLE_SETTLE", "1.5"))
IDLE_SETTLE_MAX = float(os.environ.get("IDLE_SETTLE_MAX", "30"))
PROXY_CPU = os.environ.get("PROXY_CPU", "0")
LOAD_CPU = os.environ.get("LOAD_CPU", "1")
WORKERS = int(os.environ.get("WORKERS", "1"))
CALLGRIND_REQUESTS = int(os.environ.get("CALLGRIND_REQUESTS", "20000"))
CALLGRIND_CONNS = int(os.environ.get("CALLGRIND_CONNS", "2000"))
CALLGRIND_CLIENTS = int(os.environ.get("CALLGRIND_CLIENTS", "1"))
# Under callgrind our jemalloc does not purge: purging runs on wall-clock decay timers,
# so how often it ran would depend on how slow valgrind was, and the counts would move
# between runs by several percent (8 KiB slabs re-created or not).
CALLGRIND_MALLOC_CONF = os.environ.get("CALLGRIND_MALLOC_CONF",
                                       "dirty_decay_ms:-1,muzzy_decay_ms:-1")
# Our HTTPS side: "binary" (a second `[[server]]` of the `proxy` binary with
# `tls = { certificate, key }`, the default) or "example" (the load_tls_proxy example).
TLS_SIDE = os.environ.get("TLS_SIDE", "binary")
CALLGRIND_TLS_RESUME = os.environ.get("CALLGRIND_TLS_RESUME", "1") == "1"
ALL = ["small", "64k", "newconn", "tls", "tlsnew", "idle", "slowloris"]
SCENARIOS = [s for s in os.environ.get("SCENARIOS", ",".join(ALL)).split(",") if s]
# Each load scenario runs ROUNDS times, ours and nginx back to back each round (who goes
# first alternates); the table shows the medians, and its ratio row the median of the
# rounds' own ratios, so that a slow window on the shared machine moves one round, not
# the result. The idle scenario runs once (it takes its time settling).
ROUNDS = max(1, int(os.environ.get("ROUNDS", "3")))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL_BODY = "hello, world\n"


def need(tools, hint):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: {hint}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


# --- processes and /proc ----------------------------------------------------------------


class Proc:
    """A started server: its pid tree, CPU ticks and memory from /proc."""

    def __init__(self, name, argv, cpu, log, env=None):
        self.name = name
        self.popen = subprocess.Popen(
            ["taskset", "-c", cpu] + argv, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env)

    def pids(self):
        root = self.popen.pid
        pids = [root]
        try:
            with open(f"/proc/{root}/task/{root}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        return pids

    def cpu_ticks(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return total

    def worker(self):
        """The process that serves: nginx's worker, our only process."""
        return self.pids()[-1]

    def status_kib(self, key):
        try:
            with open(f"/proc/{self.worker()}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def reset_peak(self):
        try:
            with open(f"/proc/{self.worker()}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


# --- configs ----------------------------------------------------------------------------


def nginx_common(work, name):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    temps = " ".join(f"{k}_temp_path {d};" for k in
                     ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"])
    return d, temps


def upstream_conf(work, port):
    d, temps = nginx_common(work, "upstream")
    with open(os.path.join(d, "64k"), "wb") as f:
        f.write(b"x" * 65536)
    return f"""user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
  access_log off; {temps}
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /small {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    location = /64k {{ alias {d}/64k; }}
  }}
}}
"""


def nginx_conf(work, port, tls_port, upstream, cert, key, callgrind=False):
    d, temps = nginx_common(work, "nginx")
    head = "master_process off;\n" if callgrind else ""
    return f"""{head}user root;
worker_processes {WORKERS};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
  access_log off; {temps}
  keepalive_requests 100000;
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
    }}
  }}
}}
"""


def ours_conf(port, upstream, tls_port=None, cert=None, key=None):
    tls = "" if tls_port is None else f"""
[[server]]
listen = ["127.0.0.1:{tls_port}"]
tls = {{ certificate = "{cert}", key = "{key}" }}
keepalive_requests = 100000
backlog = 4096

[[server.location]]
path = "/"
proxy_pass = "app"
"""
    return f"""[global]
workers = {WORKERS}

[upstream.app]
servers = [{{ addr = "127.0.0.1:{upstream}" }}]
keepalive = 32

[[server]]
listen = ["127.0.0.1:{port}"]
keepalive_requests = 100000
backlog = 4096

[[server.location]]
path = "/"
proxy_pass = "app"
""" + tls


# --- clients ----------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url, extra=(), duration=DURATION, conns=CONNS):
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{duration}s",
            "--timeout", "5s", "--latency", *extra, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    lat = {}
    for pct, val, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[pct] = float(val) * UNITS[unit]
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}.get(m.group(3), 1)
    return {"requests": int(m.group(1)), "rps": int(m.group(1)) / secs,
            "p50": lat.get("50"), "p99": lat.get("99"),
            "errors": (errors.group(1) if errors else "") + (sock.group(1) if sock else "")}


def hold_idle(port, n, ready, release):
    """Open n keep-alive connections, one request each, then hold them open idle."""
    socks = []
    req = f"GET /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(req)
            socks.append(s)
        for s in socks:
            got = b""
            while not got.endswith(SMALL_BODY.encode()):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed while idle")
                got += chunk
        ready.set()
        release.wait(60)
    finally:
        for s in socks:
            s.close()


def slowloris(port, n, stop):
    """n connections that each send one byte of a request header per second."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
    finally:
        for s in socks:
            s.close()


# --- scenarios --------------------------------------------------------------------------


def measure(proc, fn):
    proc.reset_peak()
    t0 = proc.cpu_ticks()
    r = fn()
    cpu = (proc.cpu_ticks() - t0) / CLK_TCK
    r["cpu_us"] = cpu * 1e6 / r["requests"] if r.get("requests") else None
    r["peak_mib"] = proc.status_kib("VmHWM") / 1024
    return r


def settle(proc, rss):
    """The resident size once it stops falling: read each second until one reading is
    within 1 % of the one before (at most IDLE_SETTLE_MAX seconds); and the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < IDLE_SETTLE_MAX:
        time.sleep(1.0)
        now = proc.status_kib("VmRSS")
        if now >= rss * 0.99:
            return now, time.monotonic() - start
        rss = now
    return rss, time.monotonic() - start


def scenario(name, proc, port, tls_port):
    http = f"http://127.0.0.1:{port}"
    https = f"https://127.0.0.1:{tls_port}"
    close = ("-H", "Connection: close")
    if name == "small":
        return measure(proc, lambda: wrk(http + "/small"))
    if name == "64k":
        return measure(proc, lambda: wrk(http + "/64k"))
    if name == "newconn":
        return measure(proc, lambda: wrk(http + "/small", close))
    if name == "tls":
        return measure(proc, lambda: wrk(https + "/small"))
    if name == "tlsnew":
        return measure(proc, lambda: wrk(https + "/small", close))
    if name == "slowloris":
        stop = threading.Event()
        t = threading.Thread(target=slowloris, args=(port, SLOW_CONNS, stop))
        t.start()
        try:
            time.sleep(1.0)  # let the slow connections open before the load starts
            return measure(proc, lambda: wrk(http + "/small"))
        finally:
            stop.set()
            t.join()
    if name == "idle":
        ready, release = threading.Event(), threading.Event()
        before = proc.status_kib("VmRSS")
        proc.reset_peak()
        t = threading.Thread(target=hold_idle, args=(port, IDLE_CONNS, ready, release))
        t.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("idle connections not established in 60 s")
            # Let the servers settle after the last response: ours parks a connection
            # once it has been idle for `park_after` (250 ms, parked within 500 ms).
            time.sleep(IDLE_SETTLE)
            after = proc.status_kib("VmRSS")
            # Then until the allocator has given back what the process freed (our
            # jemalloc returns freed pages over ~10 s, glibc's malloc may keep them): what
            # the idle connections themselves hold.
            settled, waited = settle(proc, after)
            return {"requests": IDLE_CONNS, "rps": None, "p50": None, "p99": None,
                    "cpu_us": None, "errors": "",
                    "per_conn_kib": (after - before) / IDLE_CONNS,
                    "settled": {"requests": IDLE_CONNS, "rps": None, "p50": None, "p99": None,
                                "cpu_us": None, "errors": f"after {waited:.0f} s",
                                "per_conn_kib": (settled - before) / IDLE_CONNS,
                                "peak_mib": None},
                    "peak_mib": proc.status_kib("VmHWM") / 1024}
        finally:
            release.set()
            t.join()
    raise ValueError(name)


METRICS = ("rps", "cpu_us", "p50", "p99", "peak_mib", "per_conn_kib")


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def combine(pairs):
    """One (ours, nginx) result from several rounds: each metric's median, and in
    ours["ratios"] the median of the rounds' ratios ours/nginx (a round's ratio compares
    two windows seconds apart; the medians of each side alone may come from different
    rounds)."""
    if len(pairs) == 1:
        return pairs[0]
    sides = []
    for side in (0, 1):
        rs = [p[side] for p in pairs]
        r = {k: median(x.get(k) for x in rs) for k in METRICS}
        r["errors"] = " ".join(x["errors"] for x in rs if x.get("errors"))
        sides.append(r)
    sides[0]["ratios"] = {
        k: median(p[0][k] / p[1][k] for p in pairs
                  if p[0].get(k) is not None and p[1].get(k) not in (None, 0))
        for k in METRICS}
    return sides[0], sides[1]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}x"


def print_table(rows):
    print()
    print("| scenario | server | req/s | CPU µs/req | p50 ms | p99 ms | peak RSS MiB | KiB/idle conn | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, ours, ngx in rows:
        print_table_rows(name, ours, ngx)


def print_table_rows(name, ours, ngx):
    """One scenario's rows: ours, nginx, and the ratio."""
    for who, r in (("ours", ours), ("nginx", ngx)):
        print(f"| {name} | {who} | {fmt(r['rps'], '.0f')} | {fmt(r['cpu_us'], '.1f')} | "
              f"{fmt(r['p50'], '.2f')} | {fmt(r['p99'], '.2f')} | {fmt(r['peak_mib'], '.1f')} | "
              f"{fmt(r.get('per_conn_kib'), '.2f')} | {r['errors'] or ''} |")
    if "ratios" in ours:
        cells = [fmt(ours["ratios"][k], ".2f") + ("x" if ours["ratios"][k] is not None else "")
                 for k in METRICS]
    else:
        cells = [ratio(ours.get(k), ngx.get(k)) for k in METRICS]
    print(f"| {name} | **ours/nginx** | " + " | ".join(cells) + " | |")
    if "settled" in ours and "settled" in ngx:
        print_table_rows(f"{name} (settled)", ours["settled"], ngx["settled"])


# --- callgrind --------------------------------------------------------------------------


def callgrind_count(proc, port, outfile):
    """Instructions per small keep-alive request, after a warm-up, via callgrind_control."""
    h2load = ["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", "10", "-t", "1"]
    url = f"http://127.0.0.1:{port}/small"
    subprocess.run(h2load + ["-n", "2000", url], capture_output=True, timeout=300, check=True)
    subprocess.run(["callgrind_control", "-z", str(proc.worker())], capture_output=True,
                   timeout=60, check=True)
    out = subprocess.run(h2load + ["-n", str(CALLGRIND_REQUESTS), url], capture_output=True,
                         text=True, timeout=900).stdout
    m = re.search(r"(\d+) succeeded", out)
    done = int(m.group(1)) if m else 0
    subprocess.run(["callgrind_control", "-d", str(proc.worker())], capture_output=True,
                   timeout=60, check=True)
    return callgrind_total(outfile), done


def close_requests(port, n, clients=None):
    """n requests, each on its own connection (`Connection: close`), from `clients`
    threads (CALLGRIND_CLIENTS, default 1: one connection at a time, so that the count
    does not depend on how connections interleave), one after the other on each; returns
    how many got a whole 200 response. Bounded in time by the socket timeout."""
    clients = clients or CALLGRIND_CLIENTS
    req = (f"GET /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           "Connection: close\r\n\r\n").encode()
    ok = [0] * clients

    def one(i):
        for _ in range(n // clients):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(req)
                    got = b""
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                if got.startswith(b"HTTP/1.1 200") and got.endswith(SMALL_BODY.encode()):
                    ok[i] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(ok)


def tls_requests(port, n):
    """n HTTPS requests, each on its own connection (`Connection: close`), one after the
    other, with Python's ssl (OpenSSL, as wrk). With CALLGRIND_TLS_RESUME (1, default)
    each connection resumes the session of the one before by its ticket (as wrk does:
    a PSK handshake with a new X25519 exchange, no certificate or signature); with 0
    every handshake is a full one (ECDSA P-256 signature). Returns how many got a whole
    200 response."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    req = (f"GET /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           "Connection: close\r\n\r\n").encode()
    ok, session = 0, None
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost",
                                     session=session if CALLGRIND_TLS_RESUME else None) as s:
                    s.sendall(req)
                    got = b""
                    while True:
                        try:
                            chunk = s.recv(4096)
                        except ssl.SSLZeroReturnError:
                            break
                        if not chunk:
                            break
                        got += chunk
                    if s.session is not None:
                        session = s.session
            if got.startswith(b"HTTP/1.1 200") and got.endswith(SMALL_BODY.encode()):
                ok += 1
        except (OSError, ssl.SSLError):
            pass
    return ok


def callgrind_warmed(proc, outfile, run):
    """Instructions over `run(CALLGRIND_CONNS)` after `run(200)` as a warm-up (callgrind's
    counters zeroed between, dumped after); and how many requests succeeded."""
    run(200)
    subprocess.run(["callgrind_control", "-z", str(proc.worker())], capture_output=True,
                   timeout=60, check=True)
    done = run(CALLGRIND_CONNS)
    subprocess.run(["callgrind_control", "-d", str(proc.worker())], capture_output=True,
                   timeout=60, check=True)
    return callgrind_total(outfile), done


def callgrind_tlsnew(proc, port, outfile):
    """Instructions per HTTPS request with a new connection (and TLS 1.3 handshake) each."""
    return callgrind_warmed(proc, outfile, lambda n: tls_requests(port, n))


def callgrind_newconn(proc, port, outfile):
    """Instructions per request with a new connection each."""
    return callgrind_warmed(proc, outfile, lambda n: close_requests(port, n))


def callgrind_total(outfile):
    total = 0
    for f in os.listdir(os.path.dirname(outfile)):
        if f.startswith(os.path.basename(outfile)):
            with open(os.path.join(os.path.dirname(outfile), f)) as fh:
                for line in fh:
                    if line.startswith("totals:") or line.startswith("summary:"):
                        total = max(total, int(line.split()[1]))
    return total


# --- main -------------------------------------------------------------------------------


def build():
    ours = os.environ.get("PROXY_BIN")
    tls = os.environ.get("TLS_PROXY_BIN")
    if not ours:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "proxy-bin"], cwd=ROOT, check=True)
    if TLS_SIDE == "example" and not tls:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "benches", "--example",
                        "load_tls_proxy"], cwd=ROOT, check=True)
    return (ours or os.path.join(ROOT, "target/release/proxy"),
            tls or os.path.join(ROOT, "target/release/examples/load_tls_proxy"))


def main():
    args = sys.argv[1:]
    cg = "--callgrind" in args
    # `--callgrind newconn`: a new connection per request instead of keep-alive.
    cg_mode = "small"
    for mode in ("newconn", "tlsnew"):
        if cg and mode in args:
            cg_mode = mode
    need(["nginx", "wrk", "openssl", "taskset"], "apt-get install -y nginx wrk openssl util-linux")
    if cg and cg_mode in ("newconn", "tlsnew"):
        need(["valgrind", "callgrind_control"], "apt-get install -y valgrind")
    elif cg:
        need(["valgrind", "callgrind_control", "h2load"],
             "apt-get install -y valgrind nghttp2-client")
    ours_bin, tls_bin = build()
    work = tempfile.mkdtemp(prefix="proxy-load-")
    procs = []
    log = open(os.path.join(work, "servers.log"), "w")
    try:
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        up, ours_p, ours_tls, ngx_p, ngx_tls = (free_port() for _ in range(5))
        def conf(name, text):
            p = os.path.join(work, name)
            with open(p, "w") as f:
                f.write(text)
            return p
        upstream = Proc("upstream", ["nginx", "-e", os.path.join(work, "up.err"), "-c",
                                     conf("upstream.conf", upstream_conf(work, up))], LOAD_CPU, log)
        procs.append(upstream)
        wait_port(up)
        vg = []
        if cg:
            vg = ["valgrind", "--tool=callgrind", "--dump-instr=no"]
        ours_out = os.path.join(work, "callgrind.ours")
        ngx_out = os.path.join(work, "callgrind.nginx")
        # OURS_PRELOAD: an allocator library to run our proxy with (LD_PRELOAD), to see
        # how much of the memory the process frees it gives back (glibc's malloc keeps
        # freed heap pages); OURS_MALLOC_CONF is passed as MALLOC_CONF (jemalloc).
        ours_env = None
        if os.environ.get("OURS_PRELOAD"):
            ours_env = dict(os.environ, LD_PRELOAD=os.environ["OURS_PRELOAD"])
            if os.environ.get("OURS_MALLOC_CONF"):
                ours_env["MALLOC_CONF"] = os.environ["OURS_MALLOC_CONF"]
        if cg and CALLGRIND_MALLOC_CONF:
            # tikv-jemallocator reads its options from _RJEM_MALLOC_CONF.
            ours_env = dict(ours_env or os.environ, _RJEM_MALLOC_CONF=CALLGRIND_MALLOC_CONF)
        ours = Proc("ours", (vg + [f"--callgrind-out-file={ours_out}.%p"] if cg else []) +
                    [ours_bin, "run", "-c", conf("ours.toml", ours_conf(ours_p, up, ours_tls, cert, key))],
                    PROXY_CPU, log,
                    ours_env)
        procs.append(ours)
        ngx = Proc("nginx", (vg + [f"--callgrind-out-file={ngx_out}.%p"] if cg else []) +
                   ["nginx", "-e", os.path.join(work, "ngx.err"), "-c",
                    conf("nginx.conf", nginx_conf(work, ngx_p, ngx_tls, up, cert, key, cg))],
                   PROXY_CPU, log)
        procs.append(ngx)
        wait_port(ours_p, 120 if cg else 20)
        wait_port(ngx_p, 120 if cg else 20)
        if cg:
            if cg_mode == "tlsnew":
                wait_port(ours_tls, 120)
                wait_port(ngx_tls, 120)
                a, an = callgrind_tlsnew(ours, ours_tls, ours_out)
                b, bn = callgrind_tlsnew(ngx, ngx_tls, ngx_out)
            else:
                count = callgrind_newconn if cg_mode == "newconn" else callgrind_count
                a, an = count(ours, ours_p, ours_out)
                b, bn = count(ngx, ngx_p, ngx_out)
            what = {"newconn": "new connection per request", "small": "small keep-alive",
                    "tlsnew": "new TLS 1.3 connection per request" +
                    (" (resumed, as wrk)" if CALLGRIND_TLS_RESUME else " (full handshake)")
                    }[cg_mode]
            print(f"\n| callgrind, {what} | instructions/request | requests |")
            print("|---|---:|---:|")
            print(f"| ours | {a / max(an, 1):.0f} | {an} |")
            print(f"| nginx | {b / max(bn, 1):.0f} | {bn} |")
            print(f"| **ours/nginx** | {ratio(a / max(an, 1), b / max(bn, 1))} | |")
            return
        if TLS_SIDE == "example":
            # The example listens on its own port; the binary's TLS listener goes unused.
            ours_tls = free_port()
            tls = Proc("ours-tls", [tls_bin, f"127.0.0.1:{ours_tls}", f"127.0.0.1:{up}", cert,
                                    key, str(WORKERS)], PROXY_CPU, log)
            procs.append(tls)
        else:
            tls = ours
        wait_port(ours_tls)
        # Warm-up: pools filled, pages touched, on both sides.
        for p in (ours_p, ngx_p):
            wrk(f"http://127.0.0.1:{p}/small", duration=1)
        rows = []
        turn = 0
        for name in SCENARIOS:
            is_tls = name.startswith("tls")
            o_proc = tls if is_tls else ours
            rounds = 1 if name == "idle" else ROUNDS
            pairs = []
            for _ in range(rounds):
                # Alternate who goes first, so neither always runs on a warmer machine.
                if turn % 2 == 0:
                    o = scenario(name, o_proc, ours_p, ours_tls)
                    n = scenario(name, ngx, ngx_p, ngx_tls)
                else:
                    n = scenario(name, ngx, ngx_p, ngx_tls)
                    o = scenario(name, o_proc, ours_p, ours_tls)
                turn += 1
                pairs.append((o, n))
            rows.append((name, *combine(pairs)))
            print(f"{name}: done", file=sys.stderr)
        print(f"\nDURATION={DURATION}s ROUNDS={ROUNDS} CONNS={CONNS} WORKERS={WORKERS} proxies on CPU {PROXY_CPU}, "
              f"load on CPU {LOAD_CPU}; {os.uname().release}; {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}")
        print_table(rows)
    finally:
        for p in reversed(procs):
            p.stop()
        log.close()
        if os.environ.get("KEEP_WORK"):
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
