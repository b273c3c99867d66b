"""Measures the full key chain (key check, plan limit, scope, per-key CIDR, global IP deny list):
fastgate vs a like-for-like nginx, side by side, at 1 key and at 1,000,000 keys.

Rows (all behind the same upstream nginx answering ``200 hello world``):

    fastgate plain      route ``auth = "none"``, no IP list: the proxy-only baseline
    nginx plain         proxy_pass to a keepalive upstream, as in proxy_vs_nginx.py
    fastgate keys=N     route ``auth = "key"``; N keys in the store, each with plan "bench"
                        (``limits = ["1000000/second"]``: evaluated, never refuses), scope
                        ``GET /*`` and allow CIDR ``127.0.0.0/8``; global ``[ip] deny`` of
                        ~1,000 ranges (none covers 127.0.0.1)
    nginx keys=N        ``map $http_x_api_key`` of the same N keys (401 when absent),
                        ``limit_req`` keyed by the key (1,000,000 r/s, nodelay), the same
                        ``deny`` ranges + ``allow all``, then the same proxy_pass

The keys are written straight into the SQLite store (KeyStore.bulk_import) before the
gateway starts, so its start time (process start -> "listening on") includes loading
them into shared memory. wrk cycles over up to ``--sample`` keys drawn evenly from the
set (a Lua script; the plain rows send one key, ignored, so the client cost is alike).
Every gateway runs one worker pinned to the gateway core; wrk and the upstream share
the load core. Warm-up per target, then ``--runs`` rounds alternating every target;
medians go to a markdown table and ``bench/results/<git short sha>-full-chain.json``.
Any non-2xx response fails the benchmark (a wrong key setup, not a slow gateway).

    python bench/macro/full_chain.py --runs 3 --duration 10 --keys 1,1000000
    python bench/macro/full_chain.py --quick --keys 1,1000    # smoke: 1 run of 1 s

Needs nginx, wrk and taskset (``--install`` as in proxy_vs_nginx.py). Everything listens
on 127.0.0.1, lives in a temporary directory and is stopped on exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_vs_nginx import (  # noqa: E402
    BODY, CLK_TCK, RESULTS, ROOT, Run, Server, _seconds, children, core_times, cpu_ticks, free_port,
    machine,  # noqa: F401 (bench.suite reads it as full_chain.machine)
    nginx_conf, parse_wrk, report_header, require_tools, tail, taskset, wait_port,
)

sys.path.insert(0, str(ROOT))

from fastgate import core  # noqa: E402
from fastgate.keys.store import KeyRecord, KeyStore  # noqa: E402

FG_CAPACITY_DEFAULT = 1_000_000  # fastgate's [keys] capacity default
# The master sizes the arena's extension heap (scopes, CIDRs, limits) at 64 bytes per unit of
# [keys] capacity, with no setting of its own; one scope plus one CIDR takes 128 bytes, so
# N such keys need capacity >= 2N (1M keys at the default capacity stop at ~500k: "key
# extension area full").
EXT_BYTES_PER_CAPACITY = 64
EXT_BYTES_PER_KEY = 128
SCOPES = ["GET /*"]
ALLOW = ["127.0.0.0/8"]
PLAN_LIMIT = "1000000/second"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy for 127.0.0.1


# -- keys, deny list ------------------------------------------------------------------

_B62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TO_B62 = bytes(_B62[b % 62] for b in range(256))  # slightly biased; fine for benchmark keys


def _key_maker(exact: bool):
    """core.make_key costs ~40 µs (32 x secrets.randbelow): ~40 s for 1M keys. Unless
    ``exact``, build the same ``fg_<id>_<32 base62><crc>`` shape from one urandom read
    per key with the core's own checksum; every key is checked with core.key_well_formed."""
    try:
        from fastgate._core_py import KEY_PREFIX, key_checksum
    except ImportError:
        exact = True
    if exact:
        return core.make_key

    def make(kid: str) -> str:
        body = KEY_PREFIX + kid.encode() + b"_" + os.urandom(32).translate(_TO_B62)
        return (body + key_checksum(body)).decode()
    return make


def make_keys(n: int, exact: bool) -> list[str]:
    make = _key_maker(exact)
    keys = [make(f"bench{i:011d}") for i in range(n)]  # 16-char base62 ids, like new_key_id()
    bad = [k for k in keys[:: max(1, n // 10_000)] if not core.key_well_formed(k.encode())]
    if bad:
        raise RuntimeError(f"generated keys are not well formed, e.g. {bad[0]!r}")
    return keys


def build_store(path: Path, keys: list[str], plan: str, scopes: list[str] = SCOPES,
                allow: list[str] = ALLOW) -> KeyStore:
    store = KeyStore(str(path))
    try:
        secret = store.secret
        digest = core.key_digest

        def records():
            for i, key in enumerate(keys):
                yield KeyRecord(id=key[3:19], name=f"bench {i}", plan=plan, scopes=scopes, allow_cidrs=allow,
                                slot=i, digest=digest(secret, key.encode()))
        n = store.bulk_import(records(), actor="bench")
        if n != len(keys):
            raise RuntimeError(f"bulk_import stored {n} keys, expected {len(keys)}")
    finally:
        store.close()
    return store


def sample(keys: list[str], k: int) -> list[str]:
    """Up to k keys spread evenly over the set (so their slots spread over the table)."""
    step = max(1, len(keys) // k)
    return keys[::step][:k]


def deny_ranges(n: int, seed: int = 4) -> list[str]:
    """n distinct IPv4 ranges (/12 to /32), none overlapping 127.0.0.0/8."""
    rnd = random.Random(seed)
    loopback = ipaddress.ip_network("127.0.0.0/8")
    out: dict[str, None] = {}
    while len(out) < n:
        plen = rnd.choice((12, 16, 16, 20, 24, 24, 24, 28, 32, 32))
        net = ipaddress.ip_network((rnd.randrange(1 << 24, 224 << 24), plen), strict=False)
        if not net.overlaps(loopback):
            out[str(net)] = None
    return list(out)


def wrk_script(path: Path, keys: list[str]) -> Path:
    body = ",\n".join(f'  "{k}"' for k in keys)
    path.write_text(textwrap.dedent("""\
        -- generated by bench/macro/full_chain.py: cycle over prebuilt requests, one key each
        local keys = {
        %s
        }
        local reqs, i = {}, 0
        init = function(args)
          for j, k in ipairs(keys) do reqs[j] = wrk.format("GET", "/", { ["x-api-key"] = k }) end
        end
        request = function()
          i = i %% #reqs + 1
          return reqs[i]
        end
        """) % body)
    return path


# -- gateways -------------------------------------------------------------------------

class Gateway(Server):
    """A Server with what this benchmark reports: start time, the worker, pids to leave out."""

    def __init__(self, name: str, kind: str, keys: int, argv: list[str], log: Path, cwd: Path, **info):
        self.t0 = time.monotonic()
        super().__init__(name, argv, log, cwd)
        self.kind, self.keys = kind, keys  # kind: "fastgate" | "nginx"; keys: 0 = plain proxy
        self.start_s = 0.0
        self.exclude: set[int] = set()  # fastgate's admin process: not part of the request path
        self.script: Path | None = None
        self.info = info

    def cpu_ticks(self) -> int:
        total = 0
        for pid in self.tree():
            if pid in self.exclude:
                continue
            try:
                total += cpu_ticks(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    def worker_rss_kb(self) -> dict:
        """VmRSS (and its anon/file/shmem split) of the one worker process."""
        workers = [p for p in children(self.proc.pid) if p not in self.exclude]
        if len(workers) != 1:
            raise RuntimeError(f"{self.name}: expected 1 worker, found pids {workers}")
        out = {}
        with open(f"/proc/{workers[0]}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0])
        return out


def start_fastgate(tmp: Path, name: str, core_id: int | str, config: str, keys: int, timeout: float,
                   workers: int = 1) -> Gateway:
    d = tmp / name
    d.mkdir()
    toml = d / "gateway.toml"
    toml.write_text(config)
    log = d / "stdout.log"
    argv = taskset(core_id, [sys.executable, "-m", "fastgate", "run", "--config", str(toml), "--workers", str(workers),
                             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
    srv = Gateway(name, "fastgate", keys, argv, log, d)
    try:
        listening = re.compile(rb"fastgate: listening on http://127\.0\.0\.1:(\d+)")
        deadline = srv.t0 + timeout
        while True:
            text = log.read_bytes()
            m = listening.search(text)
            if m:
                srv.start_s = time.monotonic() - srv.t0
                srv.port = int(m.group(1))
                break
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {srv.proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not announce its port within {timeout:.0f}s:\n{tail(log)}")
            time.sleep(0.01)
        wait_port(srv.port, srv.proc, log)
        for _ in range(100):  # the admin line follows the listening line in the same print
            admin = re.search(rb"fastgate: admin API on (http://127\.0\.0\.1:\d+)", log.read_bytes())
            if admin:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{name}: no 'admin API on' line:\n{tail(log)}")
        with _NO_PROXY.open(admin.group(1).decode() + "/healthz", timeout=5) as resp:
            health = json.load(resp)
        srv.exclude.add(int(health["admin_pid"]))
        loaded = re.search(rb"loaded (\d+) keys from .* in ([\d.]+)s", log.read_bytes())
        if loaded:
            srv.info["keys_loaded"], srv.info["load_s"] = int(loaded.group(1)), float(loaded.group(2))
            if srv.info["keys_loaded"] != keys and keys:
                raise RuntimeError(f"{name} loaded {srv.info['keys_loaded']} keys, expected {keys}")
    except BaseException:  # never leave a half-started gateway behind
        srv.stop()
        raise
    return srv


def start_nginx(tmp: Path, name: str, core_id: int, location: str, http_extra: str, keys: int,
                timeout: float) -> Gateway:
    port = free_port()
    conf = nginx_conf(tmp, name, port, location, http_extra)
    srv = Gateway(name, "nginx", keys, taskset(core_id, ["nginx", "-p", str(conf.parent), "-e",
                                                          str(conf.parent / "error.log"), "-c", str(conf)]),
                  conf.parent / "stdout.log", conf.parent)
    srv.port = port
    wait_port(port, srv.proc, conf.parent / "error.log", timeout)
    srv.start_s = time.monotonic() - srv.t0
    return srv


def fastgate_config(d: Path, upstream_port: int, keys: int, capacity: int, deny: list[str]) -> str:
    common = textwrap.dedent(f"""\
        [server]
        drain_timeout = 2.0
        [log]
        access = "off"
        level = "info"
        [[upstreams]]
        name = "upstream"
        targets = ["127.0.0.1:{upstream_port}"]
        """)
    if not keys:
        return common + textwrap.dedent(f"""\
            [keys]
            store = "{d}/plain-keys.db"
            [[routes]]
            name = "all"
            path = "/"
            upstream = "upstream"
            auth = "none"
            """)
    return common + textwrap.dedent(f"""\
        [keys]
        store = "{d}/keys-{keys}.db"
        capacity = {capacity}
        [plans.bench]
        limits = ["{PLAN_LIMIT}"]
        [[routes]]
        name = "all"
        path = "/"
        upstream = "upstream"
        auth = "key"
        [ip]
        deny = {json.dumps(deny)}
        """)


PROXY = "\n".join([
    "proxy_pass http://bench_upstream;",
    "proxy_http_version 1.1;",
    'proxy_set_header Connection "";',
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
])


def nginx_chain(map_file: Path, keys: int, deny: list[str]) -> tuple[str, str]:
    """(location, http_extra) for the like-for-like chain."""
    http_extra = "\n".join([
        f"map_hash_max_size {2 * keys + 1024};",  # ngx_hash_init tries the top 1000 sizes: room to spare
        "map_hash_bucket_size 1024;",  # 14 entries of a 58-byte key per bucket
        f"map $http_x_api_key $key_ok {{ default 0; include {map_file}; }}",
        f"limit_req_zone $http_x_api_key zone=k:64m rate={PLAN_LIMIT.split('/')[0]}r/s;",
    ])
    location = "\n".join([
        "if ($key_ok = 0) { return 401; }",
        "limit_req zone=k burst=1000000 nodelay;",
        *(f"deny {r};" for r in deny),
        "allow all;",
        PROXY,
    ])
    return location, http_extra


def request(srv: Gateway, key: str | None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/", headers={"x-api-key": key} if key else {})
    try:
        with _NO_PROXY.open(req, timeout=5) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}


def check(srv: Gateway, key: str) -> None:
    """200 hello world with a key; for keyed rows also 401 without one and with a wrong one."""
    status, body, headers = request(srv, key)
    if status != 200 or body != BODY:
        raise RuntimeError(f"{srv.name}: expected 200 {BODY!r} with a key, got {status} {body[:200]!r}"
                           + (f"\n{tail(srv.log)}" if srv.kind == "fastgate" else ""))
    if not srv.keys:
        return
    if srv.kind == "fastgate" and headers.get("ratelimit-limit") != PLAN_LIMIT.split("/")[0]:
        raise RuntimeError(f"{srv.name}: the plan limit is not applied (ratelimit-limit "
                           f"{headers.get('ratelimit-limit')!r}, expected {PLAN_LIMIT.split('/')[0]})")
    wrong = key[:-7] + ("A" if key[-7] != "A" else "B") + key[-6:]  # same shape, unknown secret
    for k in (None, wrong):
        status, body, _ = request(srv, k)
        if status != 401:
            raise RuntimeError(f"{srv.name}: expected 401 for key {k!r}, got {status} {body[:200]!r}")


# -- runs -----------------------------------------------------------------------------

@dataclass
class ChainRun(Run):
    keys: int = 0
    rss_kb: int = 0


def drive(srv: Gateway, args, duration: str) -> ChainRun:
    argv = taskset(args.load_core, ["wrk", "-t1", f"-c{args.connections}", f"-d{duration}", "--latency",
                                    "-s", str(srv.script), f"http://127.0.0.1:{srv.port}/"])
    cores = (args.gateway_core, args.load_core)
    before, core_before = srv.cpu_ticks(), [core_times(c) for c in cores]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=_seconds(duration) + 30)
    after, core_after = srv.cpu_ticks(), [core_times(c) for c in cores]
    core_pct = [100 * (b1 - b0) / max(t1 - t0, 1) for (b0, t0), (b1, t1) in zip(core_before, core_after)]
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    if srv.proc.poll() is not None:
        raise RuntimeError(f"{srv.name} died during the run:\n{tail(srv.log)}")
    w = parse_wrk(out.stdout)
    if w["errors"].get("non_2xx"):
        raise RuntimeError(f"{srv.name}: {w['errors']['non_2xx']} of {w['requests']} responses were not 2xx: "
                           f"the key / plan / CIDR setup is wrong, these figures would be meaningless.\n"
                           f"{out.stdout}" + (f"\n{tail(srv.log)}" if srv.kind == "fastgate" else ""))
    cpu_us = (after - before) * 1e6 / CLK_TCK
    return ChainRun(srv.name, w["requests"], w["seconds"], w["rps"], w["p50_ms"], w["p99_ms"],
                    cpu_us / max(w["requests"], 1), 100 * cpu_us / (w["seconds"] * 1e6), *core_pct, w["errors"],
                    keys=srv.keys, rss_kb=srv.worker_rss_kb()["VmRSS"])


def summarise(runs: list[ChainRun], srv: Gateway) -> dict:
    med = lambda f: statistics.median(getattr(r, f) for r in runs)  # noqa: E731
    return {
        "kind": srv.kind, "keys": srv.keys,
        **{f: med(f) for f in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "gateway_cpu_pct",
                               "gateway_core_pct", "load_core_pct")},
        "rps_min": min(r.rps for r in runs), "rps_max": max(r.rps for r in runs),
        "worker_rss_mb": max(r.rss_kb for r in runs) / 1024,
        "worker_rss_kb_detail": srv.worker_rss_kb(),
        "start_s": srv.start_s, **srv.info,
        "requests": sum(r.requests for r in runs),
        "errors": sum(sum(r.errors.values()) for r in runs),
    }


def label(kind: str, keys: int) -> str:
    return f"{kind} {'plain' if not keys else f'keys={keys:,}'}"


def tables(fig: dict, ratios: dict) -> str:
    rows = [
        "| target | requests/s | p50 ms | p99 ms | CPU µs/request | worker RSS MB | start s | gateway CPU | "
        "gateway core | load core | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in fig.items():
        rows.append(f"| {name} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['cpu_us_per_req']:.1f} | "
                    f"{s['worker_rss_mb']:.0f} | {s['start_s']:.2f} | {s['gateway_cpu_pct']:.0f}% | "
                    f"{s['gateway_core_pct']:.0f}% | {s['load_core_pct']:.0f}% | {s['errors']} |")
    rows += ["", "| fastgate / nginx | requests/s | p50 | p99 | CPU µs/request | worker RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for scen, r in ratios["fastgate_vs_nginx"].items():
        rows.append(f"| {scen} | {r['rps']:.2f}x | {r['p50_ms']:.2f}x | {r['p99_ms']:.2f}x | "
                    f"{r['cpu_us_per_req']:.2f}x | {r['worker_rss']:.2f}x |")
    for name, r in ratios["fastgate_keys_scaling"].items():
        rows.append(f"\nfastgate {name} requests/s: {r['rps']:.3f}x "
                    f"(target >= 0.95x: {'met' if r['within_5pct'] else 'NOT met'}); "
                    f"CPU µs/request {r['cpu_us_per_req']:.3f}x")
    if "fastgate_chain_vs_plain" in ratios:
        for name, r in ratios["fastgate_chain_vs_plain"].items():
            rows.append(f"fastgate {name} vs plain: requests/s {r['rps']:.2f}x, "
                        f"CPU µs/request +{r['cpu_us_delta']:.1f} µs")
    return "\n".join(rows)


# -- main -----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="measured rounds over all targets (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--gateway-core", type=int, default=1, help="CPU for the gateways under test (default 1)")
    p.add_argument("--load-core", type=int, default=0, help="CPU for wrk and the upstream (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of 1 s, 1 s warm-up")
    p.add_argument("--keys", default="1,1000000", help="comma-separated key counts (default 1,1000000)")
    p.add_argument("--sample", type=int, default=1000, help="keys wrk cycles over (default 1000)")
    p.add_argument("--deny-ranges", type=int, default=1000, help="global IP deny ranges (default 1000)")
    p.add_argument("--capacity", type=int, default=0,
                   help="fastgate [keys] capacity (default: max(2 x largest --keys + 16, 1,000,000): a key "
                        "with a scope and a CIDR takes 2 capacity units of extension heap; the same for every "
                        "keyed row so only the number of stored keys differs)")
    p.add_argument("--exact-make-key", action="store_true",
                   help="make every key with core.make_key (~40 µs each) instead of the fast equivalent")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain-proxy rows")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/<sha>-full-chain.json)")
    p.add_argument("--install", action="store_true",
                   help="run 'apt-get install -y nginx-light wrk' if nginx or wrk is missing")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 1.0, 1
    try:
        args.key_counts = sorted({int(x.replace("_", "")) for x in args.keys.split(",") if x.strip()})
    except ValueError:
        p.error(f"--keys: expected comma-separated whole numbers, found {args.keys!r}")
    if not args.key_counts or min(args.key_counts) < 1 or max(args.key_counts) > 1 << 26:
        p.error("--keys: each count must be 1..67108864")
    most = max(args.key_counts)
    need = -(-(most * EXT_BYTES_PER_KEY + 1024) // EXT_BYTES_PER_CAPACITY)
    args.capacity = args.capacity or max(need, FG_CAPACITY_DEFAULT)
    if args.capacity < need or args.capacity > 1 << 26:
        p.error(f"--capacity {args.capacity}: must be <= 67108864 and >= {need:,} (fastgate's extension heap "
                f"is {EXT_BYTES_PER_CAPACITY} B per unit of capacity; {most:,} keys with a scope and a CIDR "
                f"need {EXT_BYTES_PER_KEY} B each)")
    if args.duration <= 0 or args.runs < 1 or args.connections < 1 or args.sample < 1 or args.deny_ranges < 0:
        p.error("--duration, --runs, --connections and --sample must be positive, --deny-ranges >= 0")
    allowed = os.sched_getaffinity(0)
    for flag in ("gateway_core", "load_core"):
        if getattr(args, flag) not in allowed:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: not one of this machine's CPUs {sorted(allowed)}")
    if args.gateway_core == args.load_core:
        print("warning: gateway and load share a core; figures will be load-bound", file=sys.stderr)
    return args


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_tools(args.install)
    duration = f"{args.duration:g}s"
    warmup = f"{min(args.duration, 3.0):g}s"
    started: list[Gateway] = []
    runs: list[ChainRun] = []
    prep: dict = {}
    deny = deny_ranges(args.deny_ranges)
    with tempfile.TemporaryDirectory(prefix="fastgate-chain-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            # 1. key stores, nginx maps and wrk scripts, before anything runs
            scripts: dict[int, Path] = {}
            for n in args.key_counts:
                t0 = time.perf_counter()
                keys = make_keys(n, args.exact_make_key)
                t1 = time.perf_counter()
                build_store(tmp / f"keys-{n}.db", keys, "bench")
                t2 = time.perf_counter()
                map_file = tmp / f"keys-{n}.map"
                with open(map_file, "w") as f:
                    f.writelines(f'"{k}" 1;\n' for k in keys)
                t3 = time.perf_counter()
                scripts[n] = wrk_script(tmp / f"wrk-{n}.lua", sample(keys, args.sample))
                db = sum(os.path.getsize(p) for p in tmp.glob(f"keys-{n}.db*"))
                prep[n] = {"make_keys_s": t1 - t0, "store_import_s": t2 - t1, "store_create_s": t2 - t0,
                           "nginx_map_s": t3 - t2, "store_bytes": db, "sampled": min(n, args.sample)}
                say(f"{n:,} keys: made in {t1 - t0:.2f} s, store (bulk_import) {t2 - t1:.2f} s "
                    f"(total {t2 - t0:.2f} s, {db / 1e6:.0f} MB), nginx map {t3 - t2:.2f} s")
                del keys
            scripts[0] = scripts[args.key_counts[0]]  # plain rows: one (ignored) key header, same client cost

            # 2. servers: the upstream, then every gateway (started one by one, so start times are clean)
            upstream = start_nginx(tmp, "upstream", args.load_core, 'return 200 "hello world\\n";', "", 0, 30)
            started.append(upstream)
            upstream_block = f"upstream bench_upstream {{ server 127.0.0.1:{upstream.port}; keepalive 64; }}"
            targets: list[Gateway] = []
            for n in ([] if args.no_plain else [0]) + args.key_counts:
                timeout = 60 + 120 * n / 1e6
                say(f"starting {label('fastgate', n)} ...")
                fg = start_fastgate(tmp, f"fastgate-{n}", args.gateway_core,
                                    fastgate_config(tmp, upstream.port, n, args.capacity, deny), n, timeout)
                started.append(fg)
                say(f"  listening after {fg.start_s:.2f} s"
                    + (f" (keys loaded in {fg.info['load_s']:.2f} s)" if "load_s" in fg.info else ""))
                if n:
                    location, extra = nginx_chain(tmp / f"keys-{n}.map", n, deny)
                else:
                    location, extra = PROXY, ""
                say(f"starting {label('nginx', n)} ...")
                ng = start_nginx(tmp, f"nginx-{n}", args.gateway_core, location,
                                 "\n".join([upstream_block, extra]).strip(), n, timeout)
                started.append(ng)
                say(f"  accepting after {ng.start_s:.2f} s")
                for srv in (fg, ng):
                    srv.name = label(srv.kind, n)
                    srv.script = scripts[n]
                    targets.append(srv)
            first_key = {n: re.search(r'"(fg_[^"]+)"', scripts[n].read_text()).group(1) for n in scripts}
            for srv in targets:
                check(srv, first_key[srv.keys])
            say(f"upstream nginx :{upstream.port} (core {args.load_core}); {len(targets)} gateways on core "
                f"{args.gateway_core}; wrk -t1 -c{args.connections} -d{duration} --latency (core {args.load_core}); "
                f"{len(deny)} deny ranges; fastgate capacity {args.capacity:,}")

            # 3. warm-up (also proves every sampled key is accepted), then alternating rounds
            for srv in targets:
                say(f"warm-up {srv.name} {warmup} ...")
                drive(srv, args, warmup)
            for i in range(args.runs):
                for srv in targets:
                    r = drive(srv, args, duration)
                    runs.append(r)
                    say(f"run {i + 1}/{args.runs} {r.target:24} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:.2f} ms  "
                        f"p99 {r.p99_ms:.2f} ms  {r.cpu_us_per_req:.1f} µs CPU/req  RSS {r.rss_kb / 1024:.0f} MB  "
                        f"gateway {r.gateway_cpu_pct:.0f}%  cores: gateway {r.gateway_core_pct:.0f}% "
                        f"load {r.load_core_pct:.0f}%" + (f"  errors {r.errors}" if r.errors else ""))
            fig = {srv.name: summarise([r for r in runs if r.target == srv.name], srv) for srv in targets}
        finally:
            for srv in reversed(started):
                srv.stop()

    def ratio(a: dict, b: dict) -> dict:
        return {"rps": a["rps"] / b["rps"], "p50_ms": a["p50_ms"] / b["p50_ms"], "p99_ms": a["p99_ms"] / b["p99_ms"],
                "cpu_us_per_req": a["cpu_us_per_req"] / b["cpu_us_per_req"],
                "worker_rss": a["worker_rss_mb"] / b["worker_rss_mb"]}

    scenarios = ([] if args.no_plain else [0]) + args.key_counts
    ratios: dict = {"fastgate_vs_nginx": {
        ("plain" if not n else f"keys={n:,}"): ratio(fig[label("fastgate", n)], fig[label("nginx", n)])
        for n in scenarios}}
    base = fig[label("fastgate", args.key_counts[0])]
    ratios["fastgate_keys_scaling"] = {}
    for n in args.key_counts[1:]:
        s = fig[label("fastgate", n)]
        r = s["rps"] / base["rps"]
        ratios["fastgate_keys_scaling"][f"keys={n:,} / keys={args.key_counts[0]:,}"] = {
            "rps": r, "within_5pct": r >= 0.95, "cpu_us_per_req": s["cpu_us_per_req"] / base["cpu_us_per_req"]}
    if not args.no_plain:
        plain = fig[label("fastgate", 0)]
        ratios["fastgate_chain_vs_plain"] = {
            f"keys={n:,}": {"rps": fig[label("fastgate", n)]["rps"] / plain["rps"],
                            "cpu_us_delta": fig[label("fastgate", n)]["cpu_us_per_req"] - plain["cpu_us_per_req"]}
            for n in args.key_counts}

    report = {
        **report_header("full_chain"),
        "settings": {
            "duration_s": args.duration, "runs": args.runs, "connections": args.connections, "wrk_threads": 1,
            "gateway_core": args.gateway_core, "load_core": args.load_core, "workers": 1,
            "response_body": BODY.decode(), "keys": args.key_counts, "sampled_keys": args.sample,
            "deny_ranges": len(deny), "fastgate_capacity": args.capacity, "plan_limit": PLAN_LIMIT,
            "scopes": SCOPES, "allow_cidrs": ALLOW, "exact_make_key": args.exact_make_key,
            "core": core.IMPLEMENTATION,
        },
        "preparation": {str(n): v for n, v in prep.items()},
        "figures": fig,
        "ratio": ratios,
        "runs": [asdict(r) for r in runs],
    }
    out = args.output or RESULTS / f"{report['commit']}-full-chain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(tables(fig, ratios))
    for n, p in prep.items():
        print(f"{n:,} keys: store created in {p['store_create_s']:.1f} s (keys {p['make_keys_s']:.1f} s + "
              f"bulk_import {p['store_import_s']:.1f} s); fastgate start {fig[label('fastgate', n)]['start_s']:.2f} s, "
              f"nginx start {fig[label('nginx', n)]['start_s']:.2f} s")
    print(f"\nwritten {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if any(s["errors"] for s in fig.values()):
        say("warning: some requests hit socket errors (see 'runs' in the JSON); figures may be misleading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
