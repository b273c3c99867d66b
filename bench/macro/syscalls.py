"""Syscalls per request of the gateway worker, fastgate beside nginx, counted by strace -c.

Both proxy the same nginx upstream (plain proxy, keep-alive both ways). strace is
attached to the one worker process of each only while N requests run over C
keep-alive connections (wrk), so start-up is not counted; wrk's own count of
completed requests is the divisor. strace slows the worker down, but it counts
calls, and calls per request do not depend on speed (a slower worker batches a
little more per read, so if anything the figure errs low for both alike).

    python bench/macro/syscalls.py                 # 20,000 requests over 50 connections
    python bench/macro/syscalls.py --requests 50000 --connections 10

Needs strace, nginx and wrk (Debian packages).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_vs_nginx as pv  # noqa: E402


def worker_pid(srv: pv.Server) -> int:
    """The one worker: the master's child that holds the proxy port (fastgate also forks
    an admin process; nginx has only its worker)."""
    kids = pv.children(srv.proc.pid)
    listening = [pid for pid in kids if _listens_on(pid, srv.port)]
    return listening[0] if listening else kids[0]


def _listens_on(pid: int, port: int) -> bool:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return f"pid={pid}," in out


def count(srv: pv.Server, requests: int, connections: int) -> tuple[int, int, dict]:
    """(syscalls, requests, {syscall: calls}) for about `requests` requests."""
    pid = worker_pid(srv)
    with tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt", delete=False) as f:
        out = Path(f.name)
    st = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                          stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached
    # wrk runs for a time, not a count: aim at `requests` from a short calibration
    probe = subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", f"http://127.0.0.1:{srv.port}/"],
                           capture_output=True, text=True).stdout
    rate = max(float(re.search(r"Requests/sec:\s+([\d.]+)", probe).group(1)), 1.0)
    secs = max(1, round(requests / rate))
    run = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{secs}s", f"http://127.0.0.1:{srv.port}/"],
                         capture_output=True, text=True).stdout
    st.send_signal(signal.SIGINT)
    st.wait(30)
    done = int(re.search(r"(\d+) requests in", probe).group(1)) + int(re.search(r"(\d+) requests in", run).group(1))
    calls: dict = {}
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)(?:\s+\d+)?\s+(\w+)$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    out.unlink()
    return sum(calls.values()), done, calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--gateway-core", type=int, default=1)
    ap.add_argument("--load-core", type=int, default=0)
    args = ap.parse_args(argv)
    for tool in ("strace", "nginx", "wrk", "ss"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    started = []
    with tempfile.TemporaryDirectory(prefix="fastgate-syscalls-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream = pv.start_nginx(tmp, "upstream", args.load_core, 'return 200 "hello world\\n";')
            started.append(upstream)
            proxy = "\n".join(["proxy_pass http://bench_upstream;", "proxy_http_version 1.1;",
                               'proxy_set_header Connection "";',
                               "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"])
            http_extra = f"upstream bench_upstream {{ server 127.0.0.1:{upstream.port}; keepalive 64; }}"
            nginx = pv.start_nginx(tmp, "nginx", args.gateway_core, proxy, http_extra)
            started.append(nginx)
            fastgate = pv.start_fastgate(tmp, args.gateway_core, upstream.port)
            started.append(fastgate)
            for srv in (fastgate, nginx):
                pv.check_proxy(srv)
                subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d2s", f"http://127.0.0.1:{srv.port}/"],
                               capture_output=True)  # warm: pools full
                total, done, calls = count(srv, args.requests, args.connections)
                top = ", ".join(f"{k} {v / done:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6])
                print(f"{srv.name:8} {total / done:5.2f} syscalls/request over {done:,} requests ({top})",
                      flush=True)
        finally:
            for srv in reversed(started):
                srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
