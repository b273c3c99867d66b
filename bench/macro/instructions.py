"""Instructions per request of one fastgate worker, counted by callgrind.

Wall-clock figures on a shared 2-core VM move by ±20 %; instruction counts do
not: the same code, inputs and environment give the same count whatever else
the machine is doing. This runs a 1-worker gateway under
``valgrind --tool=callgrind --trace-children=yes`` twice, serving N1 and then
N2 keep-alive requests from one connection (an nginx upstream answers 200
bytes), and reports (I(N2) - I(N1)) / (N2 - N1) for the worker process: the
per-request user-space cost (kernel time is not counted).

    python bench/macro/instructions.py                    # key route and open route
    python bench/macro/instructions.py --route key --root /path/to/other/checkout

Needs valgrind and nginx (Debian packages). Each run takes a minute or two:
Python under callgrind is ~50x slower.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "instructions-bench-0123456789"
BODY = "x" * 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s")


def count(root: Path, route: str, n: int, keep: Path | None = None) -> int:
    """Instructions of the worker process after serving n requests (startup included).
    keep: copy the worker's callgrind file there (for callgrind_annotate)."""
    d = Path(tempfile.mkdtemp(prefix="fastgate-icount-"))
    try:
        up_port, gw_port, admin_port = _free_port(), _free_port(), _free_port()
        (d / "nginx.conf").write_text(textwrap.dedent(f"""
            worker_processes 1; error_log stderr; pid {d}/nginx.pid;
            events {{ worker_connections 256; }}
            http {{ access_log off; server {{ listen 127.0.0.1:{up_port};
                    location / {{ return 200 "{BODY}"; }} }} }}
            """))
        (d / "gw.toml").write_text(textwrap.dedent(f"""
            [server]
            listen = "127.0.0.1:{gw_port}"
            workers = 1
            [admin]
            listen = "127.0.0.1:{admin_port}"
            [keys]
            store = "keys.db"
            capacity = 1024
            failed_auth_limit = "off"
            [plans.p]
            limits = ["100000000/second"]
            [[upstreams]]
            name = "up"
            targets = ["127.0.0.1:{up_port}"]
            [[routes]]
            name = "r"
            path = "/"
            upstream = "up"
            auth = "{route}"
            """))
        cg = d / "cg"
        cg.mkdir()
        up = subprocess.Popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                              stderr=subprocess.DEVNULL)
        env = {**os.environ, "PYTHONPATH": str(root), "FASTGATE_ADMIN_TOKEN": TOKEN}
        gw = subprocess.Popen(["valgrind", "--tool=callgrind", "--trace-children=yes",
                               f"--callgrind-out-file={cg}/cg.%p", sys.executable, "-m", "fastgate", "run",
                               "--config", str(d / "gw.toml")], env=env, cwd=d, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait(f"http://127.0.0.1:{admin_port}/healthz", 600)
            health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=60))
            not_worker = {health["admin_pid"], health["master_pid"]}
            head = f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUser-Agent: bench\r\nAccept: */*\r\n"
            if route == "key":
                req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/keys", method="POST",
                                             data=json.dumps({"name": "bench", "plan": "p"}).encode(),
                                             headers={"Authorization": "Bearer " + TOKEN})
                head += "x-api-key: " + json.load(urllib.request.urlopen(req, timeout=120))["key"] + "\r\n"
            raw = (head + "\r\n").encode()
            s = socket.create_connection(("127.0.0.1", gw_port), timeout=120)
            buf = b""
            for _ in range(n):
                s.sendall(raw)
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        m = re.search(rb"content-length: (\d+)", buf[:end], re.I)
                        size = int(m.group(1)) if m else 0
                        if len(buf) >= end + 4 + size:
                            if not buf.startswith(b"HTTP/1.1 200"):
                                raise RuntimeError(f"unexpected answer: {buf[:300]!r}")
                            buf = buf[end + 4 + size:]
                            break
                    buf += s.recv(65536)
            s.close()
        finally:
            os.killpg(gw.pid, signal.SIGTERM)
            gw.wait(300)
            up.terminate()
            up.wait()
        totals = []
        for f in glob.glob(str(cg / "cg.*")):
            if int(f.rsplit(".", 1)[1]) in not_worker:
                continue  # the master and the admin process (its key snapshot can outweigh a worker)
            m = re.search(r"^(?:summary|totals): (\d+)", Path(f).read_text(errors="replace"), re.M)
            if m:
                totals.append((int(m.group(1)), f))
        total, worker = max(totals)  # the one worker (a helper process forked from it, if any, is smaller)
        if keep is not None:
            shutil.copy(worker, keep / f"callgrind.{route}.{n}")
        return total
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--route", choices=["key", "none", "both"], default="both")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    ap.add_argument("--n1", type=int, default=1000)
    ap.add_argument("--n2", type=int, default=4000)
    ap.add_argument("--keep", type=Path, help="a folder for the worker's callgrind files: "
                    "callgrind_annotate callgrind.key.4000 shows where they go")
    args = ap.parse_args(argv)
    for tool in ("valgrind", "nginx"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install {tool})", file=sys.stderr)
            return 2
    for route in (["key", "none"] if args.route == "both" else [args.route]):
        a, b = count(args.root, route, args.n1, args.keep), count(args.root, route, args.n2, args.keep)
        print(f"{route} route: {(b - a) / (args.n2 - args.n1):,.0f} instructions/request"
              f" ({args.root}, N = {args.n1} and {args.n2})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
