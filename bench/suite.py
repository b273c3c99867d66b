"""fastgate's side-by-side benchmark suite: ``python -m bench``.

Starts a fast upstream (nginx ``return 200``, or bench/upstream.py without nginx), fastgate
(``--workers N``) and a load generator (wrk, or bench/loadgen.py without it / with
``--generator builtin``), all on 127.0.0.1, pinned with taskset when available. For every row
of the matrix

    scenario  plain   route auth = "none"                       (nginx: proxy_pass)
              key     auth = "key"                              (nginx: map $http_x_api_key, 401)
              rate    key + plan limit 1,000,000/s              (nginx: map + limit_req)
              full    key + scope + plan limit + per-key CIDR + (nginx: map + limit_req + deny list
                      1,000 global deny ranges + access log      + access_log)
    routes    1 or 100 prefix routes (/svc0 ... /svc99; requests go to the last one)
    keys      keys in the store (1 or 1,000,000; each store is built once and reused)

it warms up, measures ``--runs`` runs (alternating fastgate / nginx) and keeps the medians of
requests/s, p50/p99/p99.9 latency, gateway CPU µs/request, RSS per worker and errors. With
``--scaling 1,2`` it adds plain-proxy rows at other worker counts. A markdown table goes to
stdout and JSON to bench/results/<sha>-suite.json (or ``--output``).

    python -m bench                                          # the whole matrix (a while: 1M keys)
    python -m bench --scenarios plain,key --routes 1,100 --keys 1 --runs 1 --duration 5
    python -m bench --smoke --output /tmp/suite.json         # seconds; no wrk/nginx needed

It builds on bench/macro/proxy_vs_nginx.py (processes, pinning, wrk parsing, /proc CPU) and
bench/macro/full_chain.py (key stores, nginx map/limit_req/deny config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.macro import full_chain as fc
from bench.macro.full_chain import (
    BODY, CLK_TCK, PLAN_LIMIT, PROXY, RESULTS, ROOT, Gateway, Server, children, core_times, free_port,
    nginx_chain, nginx_conf, parse_wrk, report_header, sample, tail, wait_port,
)

SCENARIOS = ("plain", "key", "rate", "full")
DESCRIBE = {
    "plain": "plain proxy",
    "key": "key auth",
    "rate": "key + rate limit",
    "full": "full chain (key + scope + limit + CIDR + access log)",
}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- small helpers ------------------------------------------------------------------

def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def counts(text: str, flag: str, p: argparse.ArgumentParser) -> list[int]:
    try:
        out = sorted({int(x.strip().replace("_", "")) for x in text.split(",") if x.strip()})
    except ValueError:
        p.error(f"{flag}: expected comma-separated whole numbers, found {text!r}")
    if not out or min(out) < 1:
        p.error(f"{flag}: each count must be >= 1")
    return out


class Progress:
    """A progress bar with rich when it is installed and stderr is a terminal, else plain lines."""

    def __init__(self, total: int, plain: bool):
        self.total, self.done = total, 0
        self._rich = None
        if not plain and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
                from rich.progress import TextColumn, TimeElapsedColumn
            except ImportError:
                pass
            else:
                self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True))
                self._rich.start()
                self._task = self._rich.add_task("bench", total=total)

    def log(self, msg: str) -> None:
        if self._rich:
            self._rich.console.print(msg, markup=False, highlight=False)
        else:
            say(msg)

    def step(self, msg: str) -> None:
        """One load run is starting."""
        if self._rich:
            self._rich.update(self._task, description=msg)
        else:
            say(f"[{self.done + 1}/{self.total}] {msg}")

    def advance(self, result: str) -> None:
        self.done += 1
        if self._rich:
            self._rich.advance(self._task)
            self._rich.console.print(f"  {result}", markup=False, highlight=False)
        else:
            say(f"    {result}")

    def stop(self) -> None:
        if self._rich:
            self._rich.stop()


def pin(cores: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cores, *argv] if cores is not None else argv


# -- load generators ----------------------------------------------------------------

WRK_LUA = """\
-- generated by bench/suite.py: cycle over prebuilt requests, one key each; exact percentiles at the end
local keys = {
%s
}
local reqs, i = {}, 0
init = function(args)
  for j, k in ipairs(keys) do reqs[j] = wrk.format("GET", "%s", { ["x-api-key"] = k }) end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
done = function(summary, latency, requests)
  io.write(string.format("FGPCT %%d %%d %%d\\n", latency:percentile(50), latency:percentile(99),
                         latency:percentile(99.9)))
end
"""


@dataclass
class Load:
    generator: str  # "wrk" | "builtin"
    cores: str | None
    connections: int

    def run(self, port: int, path: str, keys_file: Path, script: Path | None, duration: float) -> dict:
        if self.generator == "wrk":
            argv = pin(self.cores, ["wrk", "-t1", f"-c{self.connections}", f"-d{duration:g}s", "--latency",
                                    "-s", str(script), f"http://127.0.0.1:{port}{path}"])
            out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
            if out.returncode != 0:
                raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
            w = parse_wrk(out.stdout)
            pct = re.search(r"^FGPCT (\d+) (\d+) (\d+)$", out.stdout, re.M)
            if pct:
                w["p50_ms"], w["p99_ms"], w["p999_ms"] = (int(x) / 1e3 for x in pct.groups())
            else:
                w["p999_ms"] = float("nan")
            return w
        argv = pin(self.cores, [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--path", path,
                                "--keys-file", str(keys_file), "-c", str(self.connections), "-d", f"{duration:g}"])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"bench.loadgen failed ({out.returncode}):\n{out.stdout}{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])


# -- servers ------------------------------------------------------------------------

def start_upstream(tmp: Path, kind: str, cores: str | None) -> Server:
    if kind == "nginx":
        port = free_port()
        conf = nginx_conf(tmp, "upstream", port, 'return 200 "hello world\\n";')
        srv = Server("upstream", pin(cores, ["nginx", "-p", str(conf.parent), "-e", str(conf.parent / "error.log"),
                                             "-c", str(conf)]), conf.parent / "stdout.log", conf.parent)
        srv.port = port
        try:
            wait_port(port, srv.proc, conf.parent / "error.log")
        except BaseException:
            srv.stop()
            raise
        return srv
    d = tmp / "upstream"
    d.mkdir()
    srv = Server("upstream", pin(cores, [sys.executable, "-m", "bench.upstream", "--port", "0"]), d / "log", ROOT)
    deadline = time.monotonic() + 20
    while not (m := re.search(rb"listening on 127\.0\.0\.1:(\d+)", srv.log.read_bytes())):
        if srv.proc.poll() is not None or time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError(f"bench.upstream did not start:\n{tail(srv.log)}")
        time.sleep(0.02)
    srv.port = int(m.group(1))
    return srv


def route_paths(routes: int) -> list[str]:
    return [f"/svc{i}" for i in range(routes)]


def fastgate_config(d: Path, scenario: str, store: Path, upstream_port: int, routes: int, capacity: int,
                    deny: list[str]) -> str:
    out = textwrap.dedent(f"""\
        [server]
        drain_timeout = 2.0
        [log]
        access = "{d / 'access.log' if scenario == 'full' else 'off'}"
        level = "info"
        [keys]
        store = "{store}"
        capacity = {capacity}
        [plans.bench]
        limits = {json.dumps([PLAN_LIMIT] if scenario in ('rate', 'full') else [])}
        [[upstreams]]
        name = "upstream"
        targets = ["127.0.0.1:{upstream_port}"]
        """)
    if scenario == "full":
        out += f"[ip]\ndeny = {json.dumps(deny)}\n"
    for i, path in enumerate(route_paths(routes)):
        out += (f'[[routes]]\nname = "svc{i}"\npath = "{path}"\nupstream = "upstream"\n'
                f'auth = "{"none" if scenario == "plain" else "key"}"\n')
    return out


def nginx_parts(scenario: str, tmp: Path, map_file: Path, keys: int, deny: list[str]) -> tuple[str, str]:
    """(server_extra, http_extra) for a scenario, cut from full_chain.nginx_chain's like-for-like chain."""
    if scenario == "plain":
        return "", ""
    location, http_extra = nginx_chain(map_file, keys, deny)
    proxy = set(PROXY.splitlines())
    chain = [line for line in location.splitlines() if line not in proxy]
    keep = {"key": ("if ",), "rate": ("if ", "limit_req "), "full": ("if ", "limit_req ", "deny ", "allow ")}[scenario]
    server = [line for line in chain if line.startswith(keep)]
    http = [line for line in http_extra.splitlines() if scenario != "key" or not line.startswith("limit_req_zone")]
    if scenario == "full":
        server.append(f"access_log {tmp / 'nginx-access.log'};")
    return "\n".join(server), "\n".join(http)


def start_nginx(tmp: Path, name: str, cores: str | None, scenario: str, routes: int, workers: int,
                upstream_port: int, map_file: Path, keys: int, deny: list[str], timeout: float) -> Gateway:
    port = free_port()
    d = tmp / name
    server_extra, http_extra = nginx_parts(scenario, tmp / f"{name}-logs", map_file, keys, deny)
    (tmp / f"{name}-logs").mkdir()
    http_extra = f"upstream bench_upstream {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n{http_extra}"
    conf = nginx_conf(tmp, name, port, "", http_extra.strip(), workers=workers, server_extra=server_extra,
                      locations={f"{p}/": PROXY for p in route_paths(routes)})
    srv = Gateway(name, "nginx", keys, pin(cores, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)]),
                  d / "stdout.log", d)
    srv.port = port
    try:
        wait_port(port, srv.proc, d / "error.log", timeout)
    except BaseException:
        srv.stop()
        raise
    srv.start_s = time.monotonic() - srv.t0
    return srv


def worker_rss_mb(srv: Gateway) -> float:
    """Mean VmRSS of the worker processes (the master's children, less fastgate's admin process)."""
    rss = []
    for pid in children(srv.proc.pid):
        if pid in srv.exclude:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                rss += [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
        except OSError:
            pass
    return statistics.mean(rss) / 1024 if rss else 0.0


def request(port: int, path: str, key: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"x-api-key": key} if key else {})
    try:
        with _NO_PROXY.open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(srv: Gateway, scenario: str, path: str, key: str) -> None:
    """200 hello world with a key; keyed scenarios also answer 401 without one."""
    status, body = request(srv.port, path, key)
    if status != 200 or body != BODY:
        raise RuntimeError(f"{srv.name}: expected 200 {BODY!r} at {path}, got {status} {body[:200]!r}\n{tail(srv.log)}")
    if scenario != "plain":
        status, body = request(srv.port, path, None)
        if status != 401:
            raise RuntimeError(f"{srv.name}: expected 401 without a key, got {status} {body[:200]!r}")


# -- measuring ----------------------------------------------------------------------

@dataclass
class SuiteRun:
    row: str
    target: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_us_per_req: float
    gateway_cpu_pct: float
    load_core_pct: float
    rss_mb: float
    errors: dict = field(default_factory=dict)
    user_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0


def measure(srv: Gateway, load: Load, path: str, keys_file: Path, script: Path | None, duration: float,
            row: str, load_core: int | None) -> SuiteRun:
    before_u, before_s = srv.cpu_split()
    before = before_u + before_s
    core_before = core_times(load_core) if load_core is not None else (0, 0)
    w = load.run(srv.port, path, keys_file, script, duration)
    after_u, after_s = srv.cpu_split()
    after = after_u + after_s
    core_after = core_times(load_core) if load_core is not None else (0, 1)
    if srv.proc.poll() is not None:
        raise RuntimeError(f"{srv.name} died during the run:\n{tail(srv.log)}")
    cpu_us = (after - before) * 1e6 / CLK_TCK
    load_pct = 100 * (core_after[0] - core_before[0]) / max(core_after[1] - core_before[1], 1)
    return SuiteRun(row, srv.kind, w["requests"], w["seconds"], w["rps"], w["p50_ms"], w["p99_ms"],
                    w.get("p999_ms", float("nan")), cpu_us / max(w["requests"], 1),
                    100 * cpu_us / (w["seconds"] * 1e6), load_pct, worker_rss_mb(srv), w["errors"],
                    (after_u - before_u) * 1e6 / CLK_TCK / max(w["requests"], 1),
                    (after_s - before_s) * 1e6 / CLK_TCK / max(w["requests"], 1))


def summarise(runs: list[SuiteRun]) -> dict:
    med = lambda f: statistics.median(getattr(r, f) for r in runs)  # noqa: E731
    return {
        **{f: med(f) for f in ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req", "user_us_per_req",
                               "sys_us_per_req", "gateway_cpu_pct", "load_core_pct")},
        "rps_min": min(r.rps for r in runs), "rps_max": max(r.rps for r in runs),
        "worker_rss_mb": max(r.rss_mb for r in runs),
        "requests": sum(r.requests for r in runs),
        "errors": sum(sum(r.errors.values()) for r in runs),
    }


# -- main ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)} (default all)")
    p.add_argument("--routes", default="1,100", help="route counts (default 1,100)")
    p.add_argument("--keys", default="1,1000000", help="key counts in the store (default 1,1000000)")
    p.add_argument("--workers", type=int, default=1, help="fastgate workers (and nginx worker_processes) (default 1)")
    p.add_argument("--scaling", default="", help="extra plain-proxy rows at these worker counts, e.g. 1,2,4")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per target (default 3)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per target; medians reported (default 3)")
    p.add_argument("--connections", type=int, default=50, help="load generator connections (default 50)")
    p.add_argument("--generator", choices=("auto", "wrk", "builtin"), default="auto",
                   help="auto: wrk when installed, else the built-in Python generator")
    p.add_argument("--no-nginx", action="store_true", help="fastgate rows only, even when nginx is installed")
    p.add_argument("--gateway-core", type=int, default=1, help="first CPU for the gateways (default 1)")
    p.add_argument("--load-core", type=int, default=0, help="CPU for the load generator and upstream (default 0)")
    p.add_argument("--sample", type=int, default=1000, help="keys the load generator cycles over (default 1000)")
    p.add_argument("--deny-ranges", type=int, default=1000, help="global deny ranges in 'full' (default 1000)")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/<sha>-suite.json)")
    p.add_argument("--plain-progress", action="store_true", help="plain progress lines even when rich is installed")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check: plain,key x 1 route x 1 key, 1 worker, built-in generator and "
                        "upstream, no nginx, 1 run of 1 s")
    args = p.parse_args(argv)
    if args.smoke:
        args.scenarios, args.routes, args.keys, args.workers, args.scaling = "plain,key", "1", "1", 1, ""
        args.generator, args.no_nginx, args.runs, args.duration, args.warmup = "builtin", True, 1, 1.0, 0.5
        args.connections = min(args.connections, 10)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    if bad or not args.scenario_list:
        p.error(f"--scenarios: expected some of {','.join(SCENARIOS)}, found {args.scenarios!r}")
    args.route_counts = counts(args.routes, "--routes", p)
    args.key_counts = counts(args.keys, "--keys", p)
    args.scaling_counts = counts(args.scaling, "--scaling", p) if args.scaling.strip() else []
    if args.duration <= 0 or args.warmup < 0 or args.runs < 1 or args.connections < 1 or args.workers < 1:
        p.error("--duration, --runs, --connections and --workers must be positive, --warmup >= 0")
    return args


def plan_cores(args) -> tuple[str | None, dict[int, tuple[str | None, str]], list[str]]:
    """(load cores, {workers: (gateway cores, note)}, notes). Without taskset nothing is pinned."""
    notes: list[str] = []
    nproc = len(os.sched_getaffinity(0))
    allowed = sorted(os.sched_getaffinity(0))
    wanted = sorted({args.workers, *args.scaling_counts})
    if shutil.which("taskset") is None or nproc < 2:
        notes.append("no taskset or a single CPU: nothing is pinned")
        return None, {w: (None, "") for w in wanted if w <= nproc or w == args.workers}, notes
    load = args.load_core if args.load_core in allowed else allowed[0]
    rest = [c for c in allowed if c != load]
    if args.gateway_core in rest:
        rest = rest[rest.index(args.gateway_core):] + rest[:rest.index(args.gateway_core)]
    plan: dict[int, tuple[str | None, str]] = {}
    for w in wanted:
        if w <= len(rest):
            plan[w] = (",".join(map(str, rest[:w])), "")
        elif w <= nproc or w == args.workers:
            plan[w] = (",".join(map(str, allowed)), f"{w} workers on {nproc} CPUs: the gateway shares the load core")
        else:
            notes.append(f"--scaling {w}: skipped, more workers than this machine's {nproc} CPUs")
    return str(load), plan, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FASTGATE_ADMIN_TOKEN", secrets.token_urlsafe(24))
    have_wrk, have_nginx = shutil.which("wrk") is not None, shutil.which("nginx") is not None
    generator = "wrk" if args.generator == "wrk" or (args.generator == "auto" and have_wrk) else "builtin"
    if generator == "wrk" and not have_wrk:
        say("error: --generator wrk, but wrk is not on PATH")
        return 2
    with_nginx = have_nginx and not args.no_nginx
    load_cores, core_plan, notes = plan_cores(args)
    load = Load(generator, load_cores, args.connections)
    load_core = int(load_cores) if load_cores is not None else None
    gen_note = ("wrk -t1 --latency (Lua script: x-api-key cycling over sampled keys)" if generator == "wrk" else
                "built-in Python generator (bench/loadgen.py, asyncio; slower than wrk: requests/s is a floor)")
    notes.insert(0, f"load generator: {gen_note}")
    if not with_nginx:
        notes.append("no nginx rows (" + ("--no-nginx" if have_nginx else "nginx not installed") + ")")
    for n in notes:
        say(f"note: {n}")

    # rows: (scenario, routes, keys, workers)
    rows = [(s, r, k, args.workers) for k in args.key_counts for r in args.route_counts for s in args.scenario_list]
    for w in args.scaling_counts:
        if w in core_plan and w != args.workers:
            rows.append(("plain", args.route_counts[0], args.key_counts[0], w))
    targets_per_row = 2 if with_nginx else 1
    progress = Progress(len(rows) * targets_per_row * (args.runs + (1 if args.warmup else 0)), args.plain_progress)
    deny = fc.deny_ranges(args.deny_ranges)
    need = -(-(max(args.key_counts) * fc.EXT_BYTES_PER_KEY + 1024) // fc.EXT_BYTES_PER_CAPACITY)
    capacity = max(need, fc.FG_CAPACITY_DEFAULT)
    runs: list[SuiteRun] = []
    figures: dict = {}
    prep: dict = {}
    started: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fastgate-suite-") as tmp_name:
            tmp = Path(tmp_name)
            upstream = start_upstream(tmp, "nginx" if with_nginx else "python", load_cores)
            started.append(upstream)
            progress.log(f"upstream ({'nginx' if with_nginx else 'bench.upstream'}) :{upstream.port}, "
                         f"load on CPU {load_cores}, gateway CPUs {core_plan}")
            stores: dict[tuple[int, str], Path] = {}
            per_keys: dict[int, dict] = {}

            def key_set(n: int) -> dict:
                """Keys, wrk script, key file and nginx map for n keys: made once, reused by every row."""
                if n not in per_keys:
                    t0 = time.perf_counter()
                    keys = fc.make_keys(n, False)
                    map_file = tmp / f"keys-{n}.map"
                    with open(map_file, "w") as f:
                        f.writelines(f'"{k}" 1;\n' for k in keys)
                    sampled = sample(keys, args.sample)
                    keys_file = tmp / f"keys-{n}.txt"
                    keys_file.write_text("\n".join(sampled) + "\n")
                    per_keys[n] = {"keys": keys, "map": map_file, "file": keys_file, "sampled": sampled}
                    prep.setdefault(n, {})["make_keys_s"] = time.perf_counter() - t0
                return per_keys[n]

            def store(n: int, kind: str) -> Path:
                """kind "bare": plan only (plain/key/rate); "full": plus scope and allow CIDR."""
                if (n, kind) not in stores:
                    ks = key_set(n)
                    path = tmp / f"store-{kind}-{n}" / "keys.db"
                    path.parent.mkdir()
                    progress.log(f"building the {n:,}-key store ({kind}) ...")
                    t0 = time.perf_counter()
                    if kind == "full":
                        fc.build_store(path, ks["keys"], "bench")
                    else:
                        fc.build_store(path, ks["keys"], "bench", scopes=[], allow=[])
                    prep.setdefault(n, {})[f"store_{kind}_s"] = time.perf_counter() - t0
                    progress.log(f"  built in {prep[n][f'store_{kind}_s']:.1f} s")
                    stores[(n, kind)] = path
                return stores[(n, kind)]

            for scenario, routes, nkeys, workers in rows:
                row = f"{scenario} routes={routes} keys={nkeys} workers={workers}"
                ks = key_set(nkeys)
                path = route_paths(routes)[-1] + "/"
                script = None
                if generator == "wrk":
                    script = tmp / f"wrk-{nkeys}-{routes}.lua"
                    if not script.exists():
                        script.write_text(WRK_LUA % (",\n".join(f'  "{k}"' for k in ks["sampled"]), path))
                cores, core_note = core_plan[workers]
                timeout = 60 + 120 * nkeys / 1e6
                name = re.sub(r"[^a-z0-9]+", "-", row)
                d = tmp / f"fg-{name}"
                d.mkdir()
                config = fastgate_config(d, scenario, store(nkeys, "full" if scenario == "full" else "bare"),
                                         upstream.port, routes, capacity, deny)
                progress.log(f"starting fastgate: {row} ...")
                fg = fc.start_fastgate(d, "gw", cores, config, nkeys, timeout, workers=workers)
                row_targets = [fg]
                try:
                    progress.log(f"  listening after {fg.start_s:.1f} s")
                    if with_nginx:
                        ng = start_nginx(tmp, f"nginx-{name}", cores, scenario, routes, workers, upstream.port,
                                         ks["map"], nkeys, deny, timeout)
                        row_targets.append(ng)
                    for srv in row_targets:
                        srv.name = f"{srv.kind} {row}"
                        check(srv, scenario, path, ks["sampled"][0])
                    if args.warmup:
                        for srv in row_targets:
                            progress.step(f"warm-up {srv.name} {args.warmup:g}s")
                            r = measure(srv, load, path, ks["file"], script, args.warmup, row, load_core)
                            progress.advance(f"warm-up {r.rps:,.0f} req/s")
                    row_runs = []
                    for i in range(args.runs):
                        for srv in row_targets:
                            progress.step(f"run {i + 1}/{args.runs} {srv.name} {args.duration:g}s")
                            r = measure(srv, load, path, ks["file"], script, args.duration, row, load_core)
                            row_runs.append(r)
                            progress.advance(f"{r.target:8} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:.2f} ms  "
                                             f"p99 {r.p99_ms:.2f} ms  p99.9 {r.p999_ms:.2f} ms  "
                                             f"{r.cpu_us_per_req:.1f} µs CPU/req (user {r.user_us_per_req:.1f}, "
                                             f"sys {r.sys_us_per_req:.1f})  RSS {r.rss_mb:.0f} MB"
                                             + (f"  errors {r.errors}" if r.errors else ""))
                    runs += row_runs
                    fig = {"scenario": scenario, "routes": routes, "keys": nkeys, "workers": workers,
                           "gateway_cpus": cores, "note": core_note}
                    for srv in row_targets:
                        fig[srv.kind] = summarise([r for r in row_runs if r.target == srv.kind])
                        fig[srv.kind]["start_s"] = srv.start_s
                    if "nginx" in fig:
                        fig["ratio"] = {"rps": fig["fastgate"]["rps"] / fig["nginx"]["rps"],
                                        "cpu_us_per_req": fig["fastgate"]["cpu_us_per_req"]
                                        / fig["nginx"]["cpu_us_per_req"]}
                    figures[row] = fig
                finally:
                    for srv in reversed(row_targets):
                        srv.stop()
    finally:
        for srv in reversed(started):
            srv.stop()
        progress.stop()

    report = {
        **report_header("suite", machine()),
        "settings": {
            "generator": generator, "nginx": with_nginx, "duration_s": args.duration, "warmup_s": args.warmup,
            "runs": args.runs, "connections": args.connections, "load_cpus": load_cores,
            "workers": args.workers, "scaling": args.scaling_counts, "scenarios": args.scenario_list,
            "routes": args.route_counts, "keys": args.key_counts, "sampled_keys": args.sample,
            "deny_ranges": len(deny), "fastgate_capacity": capacity, "plan_limit": PLAN_LIMIT,
            "response_body": BODY.decode(), "smoke": args.smoke,
        },
        "notes": notes,
        "preparation": {str(n): v for n, v in prep.items()},
        "figures": figures,
        "runs": [asdict(r) for r in runs],
    }
    out = args.output or RESULTS / f"{report['commit']}-suite.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(figures, generator))
    notes += [f"{row}: {fig['note']}" for row, fig in figures.items() if fig["note"]]
    for n in notes:
        print(f"note: {n}")
    print(f"\nwritten {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def machine() -> dict:
    try:
        return fc.machine()
    except (OSError, IndexError):  # no nginx or wrk: proxy_vs_nginx.machine runs both
        import platform
        return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def table(figures: dict, generator: str) -> str:
    rows = [f"load generator: {generator}", "",
            "| scenario | routes | keys | workers | target | requests/s | p50 ms | p99 ms | p99.9 ms | "
            "CPU µs/req | user/sys µs | RSS/worker MB | errors | vs nginx: req/s | vs nginx: CPU/req | "
            "vs nginx: p99 |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fig in figures.values():
        for kind in ("fastgate", "nginx"):
            if kind not in fig:
                continue
            s = fig[kind]
            ratio = (f"{fig['ratio']['rps']:.2f}x | {fig['ratio']['cpu_us_per_req']:.2f}x | "
                     f"{s['p99_ms'] / fig['nginx']['p99_ms']:.2f}x"
                     if kind == "fastgate" and "ratio" in fig and "nginx" in fig else " | | ")
            rows.append(f"| {fig['scenario']} | {fig['routes']} | {fig['keys']:,} | {fig['workers']} | {kind} | "
                        f"{s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['p999_ms']:.2f} | "
                        f"{s['cpu_us_per_req']:.1f} | {s.get('user_us_per_req', 0):.1f}/{s.get('sys_us_per_req', 0):.1f} | "
                        f"{s['worker_rss_mb']:.0f} | {s['errors']} | {ratio} |")
    return "\n".join(rows)
