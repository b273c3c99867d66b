"""Measures plain-proxy throughput, latency and CPU per request: fastgate vs nginx, side by side.

Both gateways run one worker pinned to the same "gateway" core and proxy to the
same upstream (an nginx answering ``200 hello world``); wrk and the upstream share
the "load" core. Each target gets a warm-up run, then N measured runs,
alternating fastgate / nginx; the medians are printed as a markdown table and
written to ``bench/results/<git short sha>-proxy.json``.

    python bench/macro/proxy_vs_nginx.py --runs 3 --duration 10
    python bench/macro/proxy_vs_nginx.py --quick          # smoke: 1 run of 1 s

Needs nginx and wrk on PATH (``--install`` runs ``apt-get install -y nginx-light
wrk``; nothing is installed by default). Everything listens on 127.0.0.1 only,
lives in a temporary directory, and is stopped on exit (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
BODY = b"hello world\n"
READY_TIMEOUT = 20.0  # seconds for a server to start listening
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting connections after {timeout:.0f}s:\n{tail(log)}")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of one process, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # comm may contain spaces
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    return sum(cpu_split(pid))


def core_times(core: int) -> tuple[int, int]:
    """(busy, total) ticks of one CPU from /proc/stat; busy includes irq/softirq/steal."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                t = [int(x) for x in line.split()[1:]]
                return sum(t[:8]) - t[3] - t[4], sum(t[:8])
    return 0, 0


class Server:
    """One started process (own session) whose tree is stopped on stop()."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path):
        self.name = name
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=str(cwd), start_new_session=True,
        )
        self.port = 0
        self.seen_pids: set[int] = {self.proc.pid}

    def tree(self) -> list[int]:
        """The master and its direct children (the workers)."""
        pids = [self.proc.pid, *children(self.proc.pid)]
        self.seen_pids.update(pids)
        return pids

    def cpu_ticks(self) -> int:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[int, int]:
        """(user, system) ticks of the master and its workers."""
        user = system = 0
        for pid in self.tree():
            try:
                u, s = cpu_split(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            user += u
            system += s
        return user, system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} ignored SIGTERM for {STOP_TIMEOUT:.0f}s; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        for pid in self.seen_pids - {self.proc.pid}:  # orphaned workers, if any
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def taskset(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def nginx_conf(tmp: Path, name: str, port: int, location: str, http_extra: str = "", *, workers: int = 1,
               server_extra: str = "", locations: dict[str, str] | None = None) -> Path:
    """``location`` goes into ``location /``; ``locations`` (prefix -> body), when given, replaces it
    (bench/suite.py: one location per route); ``server_extra`` goes at server level."""
    d = tmp / name
    locations = locations if locations is not None else {"/": location}
    d.mkdir()
    lines = [
        "user root;" if os.geteuid() == 0 else "",  # as root, workers would otherwise drop to nobody
        "daemon off;",
        "master_process on;",
        f"worker_processes {workers};",
        f"pid {d}/nginx.pid;",
        f"error_log {d}/error.log warn;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        *(f"    {kind}_temp_path {d}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "    keepalive_requests 1000000;",
        "    keepalive_timeout 120s;",
        *(f"    {line}" for line in http_extra.splitlines()),
        "    server {",
        f"        listen 127.0.0.1:{port} backlog=4096;",
        *(f"        {line}" for line in server_extra.splitlines()),
        *(line for prefix, body in locations.items() for line in (
            f"        location {prefix} {{", *(f"            {b}" for b in body.splitlines()), "        }")),
        "    }",
        "}",
    ]
    conf = d / "nginx.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_nginx(tmp: Path, name: str, core: int, location: str, http_extra: str = "") -> Server:
    port = free_port()
    conf = nginx_conf(tmp, name, port, location, http_extra)
    srv = Server(name, taskset(core, ["nginx", "-p", str(conf.parent), "-e", str(conf.parent / "error.log"),
                                      "-c", str(conf)]), conf.parent / "stdout.log", conf.parent)
    srv.port = port
    wait_port(port, srv.proc, conf.parent / "error.log")
    return srv


def start_fastgate(tmp: Path, core: int, upstream_port: int) -> Server:
    d = tmp / "fastgate"
    d.mkdir()
    config = d / "gateway.toml"
    config.write_text(textwrap.dedent(f"""\
        [server]
        drain_timeout = 2.0
        [keys]
        store = "{d}/keys.db"
        [log]
        access = "off"
        level = "warning"
        [[upstreams]]
        name = "upstream"
        targets = ["127.0.0.1:{upstream_port}"]
        [[routes]]
        name = "all"
        path = "/"
        upstream = "upstream"
        auth = "none"
        """))
    log = d / "stdout.log"
    srv = Server("fastgate", taskset(core, [sys.executable, "-m", "fastgate", "run", "--config", str(config),
                                             "--workers", "1", "--listen", "127.0.0.1:0"]), log, d)
    deadline = time.monotonic() + READY_TIMEOUT
    pattern = re.compile(rb"fastgate: listening on http://127\.0\.0\.1:(\d+)")
    while time.monotonic() < deadline:
        m = pattern.search(log.read_bytes())
        if m:
            srv.port = int(m.group(1))
            break
        if srv.proc.poll() is not None:
            raise RuntimeError(f"fastgate exited with {srv.proc.returncode}:\n{tail(log)}")
        time.sleep(0.05)
    else:
        raise RuntimeError(f"fastgate did not announce its port within {READY_TIMEOUT:.0f}s:\n{tail(log)}")
    wait_port(srv.port, srv.proc, log)
    return srv


def check_proxy(srv: Server) -> None:
    """One request through the proxy must come back as the upstream's 200 hello world."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/", timeout=5) as resp:
        body = resp.read()
        if resp.status != 200 or body != BODY:
            raise RuntimeError(f"{srv.name}: expected 200 {BODY!r}, got {resp.status} {body!r}")


# -- wrk ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


@dataclass
class Run:
    target: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    gateway_cpu_pct: float  # gateway CPU time / wall time: near 100 means the gateway core is the bottleneck
    gateway_core_pct: float  # whole gateway core busy, any process, incl. softirq (/proc/stat)
    load_core_pct: float  # whole load core busy (wrk + upstream): near 100 means the load side is the limit
    errors: dict = field(default_factory=dict)


def parse_wrk(out: str) -> dict:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if not (m and rps and p50 and p99):
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors.update({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups()) if int(v)})
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors["non_2xx"] = int(non2xx.group(1))
    return {
        "requests": int(m.group(1)),
        "seconds": _ms(m.group(2), m.group(3)) / 1e3,
        "rps": float(rps.group(1)),
        "p50_ms": _ms(*p50.groups()),
        "p99_ms": _ms(*p99.groups()),
        "errors": errors,
    }


def drive(srv: Server, args, duration: str) -> Run:
    argv = taskset(args.load_core, ["wrk", "-t1", f"-c{args.connections}", f"-d{duration}", "--latency",
                                    f"http://127.0.0.1:{srv.port}/"])
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
    cpu_us = (after - before) * 1e6 / CLK_TCK
    return Run(srv.name, w["requests"], w["seconds"], w["rps"], w["p50_ms"], w["p99_ms"],
               cpu_us / max(w["requests"], 1), 100 * cpu_us / (w["seconds"] * 1e6), *core_pct, w["errors"])


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h)?", duration)
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


# -- report -------------------------------------------------------------------------

def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def report_header(benchmark: str, machine_info: dict | None = None) -> dict:
    """What every results JSON starts with: which benchmark, which commit (and
    whether fastgate/ had uncommitted changes), when, on what machine."""
    return {
        "benchmark": benchmark,
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "fastgate")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info if machine_info is not None else machine(),
    }


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {
        "cpu": cpu or platform.processor(),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_v.removeprefix("nginx version: "),
        "wrk": wrk_v[0].split(" Copyright")[0] if wrk_v else "",
    }


def summarise(runs: list[Run]) -> dict:
    return {
        "rps": statistics.median(r.rps for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "cpu_us_per_req": statistics.median(r.cpu_us_per_req for r in runs),
        "gateway_cpu_pct": statistics.median(r.gateway_cpu_pct for r in runs),
        "gateway_core_pct": statistics.median(r.gateway_core_pct for r in runs),
        "load_core_pct": statistics.median(r.load_core_pct for r in runs),
        "requests": sum(r.requests for r in runs),
        "errors": sum(sum(r.errors.values()) for r in runs),
    }


def table(fig: dict) -> str:
    fg, ng = fig["fastgate"], fig["nginx"]
    rows = [
        "| target | requests/s | p50 ms | p99 ms | CPU µs/request | gateway CPU | gateway core | load core | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("fastgate", fg), ("nginx", ng)):
        rows.append(f"| {name} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                    f"{s['cpu_us_per_req']:.1f} | {s['gateway_cpu_pct']:.0f}% | "
                    f"{s['gateway_core_pct']:.0f}% | {s['load_core_pct']:.0f}% | {s['errors']} |")
    rows.append(f"| fastgate / nginx | {fig['ratio']['rps']:.2f}x | {fg['p50_ms'] / ng['p50_ms']:.2f}x | "
                f"{fg['p99_ms'] / ng['p99_ms']:.2f}x | {fig['ratio']['cpu_us_per_req']:.2f}x | | | | |")
    return "\n".join(rows)


# -- main ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per target (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--gateway-core", type=int, default=1, help="CPU for the gateway under test (default 1)")
    p.add_argument("--load-core", type=int, default=0, help="CPU for wrk and the upstream (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run of 1 s, 1 s warm-up")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/<sha>-proxy.json)")
    p.add_argument("--install", action="store_true",
                   help="run 'apt-get install -y nginx-light wrk' if nginx or wrk is missing")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 1.0, 1
    if args.duration <= 0 or args.runs < 1 or args.connections < 1:
        p.error("--duration, --runs and --connections must be positive")
    allowed = os.sched_getaffinity(0)
    for flag in ("gateway_core", "load_core"):
        if getattr(args, flag) not in allowed:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: not one of this machine's CPUs {sorted(allowed)}")
    if args.gateway_core == args.load_core:
        print("warning: gateway and load share a core; figures will be load-bound", file=sys.stderr)
    return args


def require_tools(install: bool) -> None:
    missing = [t for t in ("nginx", "wrk", "taskset", "ps") if shutil.which(t) is None]
    if missing and install:
        apt = ["apt-get", "install", "-y", "nginx-light", "wrk"]
        if os.geteuid() != 0:
            apt.insert(0, "sudo")
        print("running:", " ".join(apt), file=sys.stderr)
        subprocess.run(apt, check=False, timeout=600)
        missing = [t for t in ("nginx", "wrk", "taskset", "ps") if shutil.which(t) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found on PATH; this benchmark needs nginx, wrk, taskset and ps.\n"
              f"  install them with: apt-get install -y nginx-light wrk   (or rerun with --install)",
              file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_tools(args.install)
    duration = f"{args.duration:g}s"
    warmup = f"{min(args.duration, 3.0):g}s"
    started: list[Server] = []
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fastgate-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            upstream = start_nginx(tmp, "upstream", args.load_core,
                                   'return 200 "hello world\\n";')
            started.append(upstream)
            proxy = "\n".join([
                "proxy_pass http://bench_upstream;",
                "proxy_http_version 1.1;",
                'proxy_set_header Connection "";',
                "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            ])
            http_extra = f"upstream bench_upstream {{ server 127.0.0.1:{upstream.port}; keepalive 64; }}"
            nginx = start_nginx(tmp, "nginx", args.gateway_core, proxy, http_extra)
            started.append(nginx)
            fastgate = start_fastgate(tmp, args.gateway_core, upstream.port)
            started.append(fastgate)
            targets = [fastgate, nginx]
            for srv in targets:
                check_proxy(srv)
            print(f"upstream nginx :{upstream.port} (core {args.load_core}); fastgate :{fastgate.port}, "
                  f"nginx :{nginx.port} (core {args.gateway_core}); wrk -t1 -c{args.connections} -d{duration} "
                  f"(core {args.load_core})", file=sys.stderr)
            for srv in targets:
                print(f"warm-up {srv.name} {warmup} ...", file=sys.stderr)
                drive(srv, args, warmup)
            for i in range(args.runs):
                for srv in targets:
                    r = drive(srv, args, duration)
                    runs.append(r)
                    print(f"run {i + 1}/{args.runs} {r.target:8} {r.rps:>10,.0f} req/s  p50 {r.p50_ms:.2f} ms  "
                          f"p99 {r.p99_ms:.2f} ms  {r.cpu_us_per_req:.1f} µs CPU/req  gateway {r.gateway_cpu_pct:.0f}%  "
                          f"cores: gateway {r.gateway_core_pct:.0f}% load {r.load_core_pct:.0f}%"
                          + (f"  errors {r.errors}" if r.errors else ""), file=sys.stderr)
        finally:
            for srv in reversed(started):
                srv.stop()

    fig = {name: summarise([r for r in runs if r.target == name]) for name in ("fastgate", "nginx")}
    fig["ratio"] = {
        "rps": fig["fastgate"]["rps"] / fig["nginx"]["rps"],
        "cpu_us_per_req": fig["fastgate"]["cpu_us_per_req"] / fig["nginx"]["cpu_us_per_req"],
    }
    report = {
        **report_header("proxy_vs_nginx"),
        "settings": {
            "duration_s": args.duration, "runs": args.runs, "connections": args.connections, "wrk_threads": 1,
            "gateway_core": args.gateway_core, "load_core": args.load_core, "workers": 1,
            "response_body": BODY.decode(),
        },
        "figures": fig,
        "runs": [asdict(r) for r in runs],
    }
    out = args.output or RESULTS / f"{report['commit']}-proxy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(fig))
    print(f"\nwritten {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if fig["fastgate"]["errors"] or fig["nginx"]["errors"]:
        print("warning: some requests failed (see 'runs' in the JSON); figures may be misleading", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
