"""Start-up to first served request with N keys (default 1,000,000): full load vs snapshot.

Builds an SQLite key store of N synthetic keys (as load_keys.py does) plus one real key,
then runs a real `fastgate run` (1 worker) three times on it:

1. full    no snapshot: the master loads every key (and the admin process writes the
           first snapshot; a clean stop writes the last one)
2. snap    the same store again: from the snapshot, nothing to replay
3. replay  after revoking 1,000 keys and adding 1,000 straight in the store while it
           was down: from the snapshot, then those 2,000 changes

and reports, for each, seconds from spawning the process to the first 200 answered
with the real key through the gateway (polled every 10 ms), the master's own load time
from its log line, and the time a clean stop took (it writes the snapshot).

    python bench/macro/fast_start.py              # 1,000,000 keys
    python bench/macro/fast_start.py -n 200000 --json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.macro.load_keys import synth  # noqa: E402
from fastgate import core  # noqa: E402
from fastgate.keys import KeyRecord, KeyStore  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def first_200(port: int, key: str, proc, deadline: float) -> float:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastgate exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/", headers={"x-api-key": key})
            status = c.getresponse().status
            c.close()
            if status == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError("no 200 before the deadline")


def run_once(d: Path, cfg: Path, key: str, name: str) -> dict:
    port, aport = free_port(), free_port()
    log = d / f"{name}.log"
    with open(log, "wb") as lf:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "--config", str(cfg), "--workers", "1",
                                 "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{aport}"],
                                cwd=str(d), stdout=subprocess.DEVNULL, stderr=lf,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            t1 = first_200(port, key, proc, t0 + 600)
            if name == "full":  # let the admin process write its first snapshot (soon after a full load)
                deadline = time.monotonic() + 120
                while "wrote key snapshot" not in log.read_text(errors="replace") and time.monotonic() < deadline:
                    time.sleep(0.1)
            # a clean stop writes the snapshot: wait until the admin process is up to do it
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", aport, timeout=2)
                    c.request("GET", "/healthz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            time.sleep(0.5)
            t2 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(300)
            t3 = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    m = re.search(r"loaded (\d+) keys from .* in ([\d.]+)s \(([^;]*);", text)
    w = re.findall(r"wrote key snapshot .* \((\d+) MiB\) in ([\d.]+)s", text)
    return {
        "first_200_s": round(t1 - t0, 3),
        "master_load_s": float(m.group(2)) if m else None,
        "how": m.group(3) if m else None,
        "keys": int(m.group(1)) if m else None,
        "stop_s": round(t3 - t2, 3),
        "snapshot_mib": int(w[-1][0]) if w else None,
        "snapshot_write_s": float(w[-1][1]) if w else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--keys", type=int, default=1_000_000)
    ap.add_argument("--ext-per-key", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    n = args.keys
    d = Path(tempfile.mkdtemp(prefix="fg-fast-start-"))
    up = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(uport := free_port())],
                          cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = KeyStore(str(d / "keys.db"))
        t = time.perf_counter()
        store.bulk_import(synth(n, False), actor="bench")
        kid = store.new_key_id()
        key = core.make_key(kid)
        store.create(KeyRecord(id=kid, name="probe", digest=core.key_digest(store.secret, key.encode())), "bench")
        store.close()
        if not args.json:
            print(f"built a store of {n + 1:,} keys in {time.perf_counter() - t:.1f} s (not counted)", flush=True)
        cfg = d / "gw.toml"
        cfg.write_text(f"""
[keys]
store = "keys.db"
capacity = {n + 10_000}
ext_bytes = {args.ext_per_key * (n + 10_000)}
[log]
access = "off"
[[upstreams]]
name = "app"
targets = ["127.0.0.1:{uport}"]
[[routes]]
name = "keyed"
path = "/"
upstream = "app"
auth = "key"
""")
        res = {"keys": n + 1, "core": core.IMPLEMENTATION, "runs": {}}
        for name in ("full", "snap"):
            res["runs"][name] = run_once(d, cfg, key, name)
            if not args.json:
                print(f"  {name:<7} {res['runs'][name]}", flush=True)
        store = KeyStore(str(d / "keys.db"))
        ids = list(store.id_slots())[:1000]
        for k in ids:
            store.revoke(k, "bench")
        for i in range(1000):
            k = store.new_key_id()
            store.create(KeyRecord(id=k, name=f"new {i}", digest=os.urandom(32)), "bench")
        store.close()
        res["runs"]["replay"] = run_once(d, cfg, key, "replay")
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"  replay  {res['runs']['replay']}")
            f, s = res["runs"]["full"]["first_200_s"], res["runs"]["snap"]["first_200_s"]
            print(f"start-up to first served request, {n + 1:,} keys: full load {f:.2f} s, from snapshot {s:.2f} s, "
                  f"from snapshot + 2,000 changes {res['runs']['replay']['first_200_s']:.2f} s")
        return 0
    finally:
        up.terminate()
        up.wait()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
