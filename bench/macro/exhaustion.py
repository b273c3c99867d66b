"""No table an attacker can fill, measured through a real gateway (issue 10).

A gateway with [keys] capacity = N (default 1,000,000) and N keys on a plan
with a limit is hit, through wrk on loopback, by:

1. 2N distinct client addresses (N IPv4, N IPv6 /64s, given as X-Forwarded-For
   from a trusted proxy), each sending one bad key to the key route (the
   failed-auth table) and one request to an open route with ip_limits (the
   address table);
2. then every one of the N keys once, each from yet another address.

It reports the status counts of each phase. What must hold: in phase 2 every
key is admitted (all 200: keys have their own counters and are never refused
for lack of space); in phase 1 the failed-auth table never refuses for lack of
space (401s only: it evicts the stalest) and the ip_limits table fails closed
(429) once it is full, never open.

    python bench/macro/exhaustion.py              # N = 1,000,000 (several minutes)
    python bench/macro/exhaustion.py -n 100000    # a quicker look
    python bench/macro/exhaustion.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_chain import build_store, make_keys, start_fastgate, start_nginx  # noqa: E402
from proxy_vs_nginx import report_header, taskset  # noqa: E402

# Per-thread counts come back to the main script through thread:get (wrk's
# done() runs in its own Lua state); a thread stops itself after its quota.
COUNTING = """
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
response = function(status, headers, body)
  stats[status] = (stats[status] or 0) + 1
  answered = answered + 1
  if answered >= quota then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local total = {{}}
  for _, t in ipairs(threads) do
    for s, c in pairs(t:get("stats")) do total[s] = (total[s] or 0) + c end
  end
  local out = {{}}
  for s, c in pairs(total) do out[#out + 1] = string.format('"%d": %d', s, c) end
  io.write("STATUS {{" .. table.concat(out, ", ") .. "}}\\n")
end
"""

PHASE1 = COUNTING + """
-- 2N distinct clients: a bad key on /k, then /open, each pair from its own address
init = function(args) stats, answered, quota, i = {{}}, 0, 4 * {n}, 0 end
local bad = "{bad}"
request = function()
  local j = i
  i = i + 1
  local a = math.floor(j / 2)
  local addr
  if a < {n} then
    addr = string.format("%d.%d.%d.%d", 1 + math.floor(a / 16777216) % 200, math.floor(a / 65536) % 256,
                         math.floor(a / 256) % 256, a % 256)
  else
    local b = a - {n}
    addr = string.format("2001:db8:%x:%x::1", math.floor(b / 65536), b % 65536)
  end
  if j % 2 == 0 then
    return wrk.format("GET", "/k/x", {{ ["x-api-key"] = bad, ["x-forwarded-for"] = addr }})
  end
  return wrk.format("GET", "/open/x", {{ ["x-forwarded-for"] = addr }})
end
"""

PHASE2 = COUNTING + """
-- every key once, each from its own address
init = function(args)
  stats, answered, i, keys = {{}}, 0, 0, {{}}
  for line in io.lines("{keys}") do keys[#keys + 1] = line end
  quota = #keys
end
request = function()
  i = i + 1
  local k = keys[(i - 1) % #keys + 1]
  local addr = string.format("10.%d.%d.%d", math.floor(i / 65536) % 256, math.floor(i / 256) % 256, i % 256)
  return wrk.format("GET", "/k/x", {{ ["x-api-key"] = k, ["x-forwarded-for"] = addr }})
end
"""


def config(upstream_port: int, n: int) -> str:
    return textwrap.dedent(f"""
        [server]
        workers = 1
        [keys]
        store = "{{store}}"
        capacity = {n}
        ext_bytes = {256 * n}
        failed_auth_limit = "1000/minute"
        [plans.p]
        limits = ["100/minute"]
        [ip]
        trusted_proxies = ["127.0.0.0/8"]
        [[upstreams]]
        name = "up"
        targets = ["127.0.0.1:{upstream_port}"]
        [[routes]]
        name = "k"
        path = "/k"
        upstream = "up"
        auth = "key"
        [[routes]]
        name = "open"
        path = "/open"
        upstream = "up"
        auth = "none"
        ip_limits = ["1000/minute"]
        """)


TOKEN = "exhaustion-bench-" + os.urandom(8).hex()


def answered(admin: str) -> int:
    """Requests the gateway has answered so far (its /metrics, published ~1/s)."""
    req = urllib.request.Request(admin + "/metrics", headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("fastgate_requests_total{"))


def run_wrk(core: int, port: int, admin: str, script: Path, expect: int) -> tuple[dict, float]:
    """wrk with the script until the gateway has answered `expect` more requests
    (a wrk thread that stops itself still waits out -d, so SIGINT ends it,
    which makes wrk print its summary and run done())."""
    base = answered(admin)
    t0 = time.monotonic()
    proc = subprocess.Popen(taskset(core, ["wrk", "-t1", "-c32", "-d1h", "-s", str(script),
                                           f"http://127.0.0.1:{port}"]), stdout=subprocess.PIPE, text=True)
    while proc.poll() is None and answered(admin) - base < expect:
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    m = re.search(r"STATUS (\{.*\})", out)
    return (json.loads(m.group(1)) if m else {}), elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="keys, and the [keys] capacity (default 1,000,000)")
    ap.add_argument("--gateway-core", type=int, default=1)
    ap.add_argument("--load-core", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    n = args.n
    os.environ["FASTGATE_ADMIN_TOKEN"] = TOKEN  # the gateway inherits it: /metrics needs it
    fig = report_header("exhaustion")
    fig.update(n=n)
    with tempfile.TemporaryDirectory(prefix="fastgate-exhaust-") as tmp_name:
        tmp = Path(tmp_name)
        started = []
        try:
            keys = make_keys(n, exact=False)
            build_store(tmp / "keys.db", keys, "p", scopes=[], allow=[])
            (tmp / "keys.txt").write_text("\n".join(keys) + "\n")
            from fastgate import core

            bad = core.make_key("nosuchkey0000000")
            del keys
            print(f"{n:,} keys stored", flush=True)
            upstream = start_nginx(tmp, "upstream", args.load_core, 'return 200 "ok\\n";', "", 0, 30)
            started.append(upstream)
            cfg = config(upstream.port, n).replace("{store}", str(tmp / "keys.db"))
            fg = start_fastgate(tmp, "fastgate", args.gateway_core, cfg, n, 60 + 120 * n / 1e6)
            started.append(fg)
            print(f"gateway listening after {fg.start_s:.1f} s", flush=True)
            admin = re.search(r"admin API on (http://\S+)", fg.log.read_text()).group(1)
            s1 = tmp / "phase1.lua"
            s1.write_text(PHASE1.format(n=n, bad=bad))
            st1, t1 = run_wrk(args.load_core, fg.port, admin, s1, 4 * n)
            print(f"phase 1 (2N addresses, {4 * n:,} requests) in {t1:.0f} s: {st1}", flush=True)
            s2 = tmp / "phase2.lua"
            s2.write_text(PHASE2.format(keys=tmp / "keys.txt"))
            st2, t2 = run_wrk(args.load_core, fg.port, admin, s2, n)
            print(f"phase 2 (every key once) in {t2:.0f} s: {st2}", flush=True)
            fig.update(phase1=st1, phase1_s=t1, phase2=st2, phase2_s=t2)
            refused = sum(c for s, c in st2.items() if s != "200")
            fig["keys_refused"] = refused
            print(f"keys refused: {refused} of {sum(st2.values()):,}")
        finally:
            for srv in reversed(started):
                srv.stop()
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))
    return 0 if fig.get("keys_refused") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
