#!/usr/bin/env python3
"""Two builds of our proxy side by side, in the same seconds: CPU per request of each.

compare.py runs ours, then nginx, one after the other; on a shared machine the CPU a
request costs moves by tens of percent between such windows, so a small difference
between two builds is lost. Here both builds run at once, pinned to the same CPU (the
scheduler splits it between them), each with its own wrk (50 connections, small
responses) and, with SLOW=1, its own 1,000 slow clients (compare.py's `slowloris`: one
header byte per second each). The ratio of their CPU per request comes from the same
window.

    A_BIN=path/to/proxy B_BIN=path/to/other/proxy SLOW=1 python3 benches/load/ab.py
    A_BIN=... B_BIN=... SCENARIO=tlsnew SLOW=0 python3 benches/load/ab.py

SCENARIO=tlsnew loads each build's HTTPS listener (compare.py's: `tls = { certificate,
key }`, an ECDSA P-256 certificate) with a new connection and TLS 1.3 handshake per
request (wrk with `Connection: close`) instead of small keep-alive requests.

Environment: A_BIN, B_BIN (required), SCENARIO (small or tlsnew; small), SLOW (1: with
slow clients, 0: without; 1),
ROUNDS (3), DURATION, SLOW_CONNS, PROXY_CPU, LOAD_CPU as in compare.py. Everything
listens on 127.0.0.1, every run is bounded in time, and every process it started is
stopped when it ends.
"""

import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402


def main():
    bins = {"A": os.environ["A_BIN"], "B": os.environ["B_BIN"]}
    slow = os.environ.get("SLOW", "1") == "1"
    scenario = os.environ.get("SCENARIO", "small")
    if scenario not in ("small", "tlsnew"):
        sys.exit(f"SCENARIO={scenario}: small or tlsnew")
    rounds = int(os.environ.get("ROUNDS", "3"))
    c.need(["nginx", "wrk", "taskset"], "apt-get install -y nginx wrk util-linux")
    work = tempfile.mkdtemp(prefix="proxy-ab-")
    log = open(os.path.join(work, "servers.log"), "w")

    def conf(name, text):
        p = os.path.join(work, name)
        with open(p, "w") as f:
            f.write(text)
        return p

    procs = []
    try:
        up = c.free_port()
        procs.append(c.Proc("upstream", ["nginx", "-e", os.path.join(work, "up.err"), "-c",
                                         conf("upstream.conf", c.upstream_conf(work, up))],
                            c.LOAD_CPU, log))
        c.wait_port(up)
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        c.subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                          "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                          "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                          "-keyout", key, "-out", cert], check=True, capture_output=True)
        ports, tls_ports, servers = {}, {}, {}
        for k, b in bins.items():
            ports[k], tls_ports[k] = c.free_port(), c.free_port()
            servers[k] = c.Proc(k, [b, "run", "-c", conf(f"{k}.toml", c.ours_conf(
                ports[k], up, tls_ports[k], cert, key))], c.PROXY_CPU, log)
            procs.append(servers[k])
        for p in list(ports.values()) + list(tls_ports.values()):
            c.wait_port(p)
        print("| round | A µs/req | B µs/req | B/A | A req | B req |")
        print("|---|---:|---:|---:|---:|---:|")
        for rnd in range(rounds):
            stop = threading.Event()
            clients = []
            if slow:
                for p in ports.values():
                    t = threading.Thread(target=c.slowloris, args=(p, c.SLOW_CONNS, stop))
                    t.start()
                    clients.append(t)
                time.sleep(1.5)  # let the slow connections open
            res = {}
            t0 = {k: s.cpu_ticks() for k, s in servers.items()}

            def load(k):
                if scenario == "tlsnew":
                    res[k] = c.wrk(f"https://127.0.0.1:{tls_ports[k]}/small",
                                   ("-H", "Connection: close"))
                else:
                    res[k] = c.wrk(f"http://127.0.0.1:{ports[k]}/small")

            ws = [threading.Thread(target=load, args=(k,)) for k in bins]
            for w in ws:
                w.start()
            for w in ws:
                w.join()
            us = {k: (s.cpu_ticks() - t0[k]) / c.CLK_TCK * 1e6 / max(res[k]["requests"], 1)
                  for k, s in servers.items()}
            stop.set()
            for t in clients:
                t.join()
            print(f"| {rnd} | {us['A']:.1f} | {us['B']:.1f} | {us['B'] / us['A']:.3f} | "
                  f"{res['A']['requests']} | {res['B']['requests']} |", flush=True)
            time.sleep(1)
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
