"""GET /metrics: the Prometheus text format, summed over every worker.

Written by hand rather than with prometheus-client: the numbers come from the
workers' shared-memory snapshots (summed here at scrape time), not from one
process's registry, and prometheus-client's own multi-process mode would need
a directory of per-pid files and its import on the hot path. The format is
small and stable; the tests parse this output with prometheus-client's parser.
Labels are low-cardinality only: route, status class, deciding stage, plan,
upstream target. Never a key id.

Every *_total (and the histogram) is monotonic while the gateway runs: a
worker slot's region carries the totals of the slot's earlier, dead
processes (fastgate.stats, carry), so a crash, a SIGKILL or a reload that
retires workers never takes counts away; a killed worker loses only what it
counted after its last publish (about a second). Gauges are the live
processes' own.
"""

from __future__ import annotations

from ..workers.worker import LATENCY_BUCKETS


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def render(snapshots: list[dict], master: dict | None, keys_stats: dict, rate_stats: dict, key_capacity: int,
           rate_capacity: int) -> str:
    requests: dict[tuple, int] = {}
    latency: dict[str, list] = {}
    upstream: dict[str, list] = {}
    idle: dict[str, int] = {}
    conns = refused = cuts = 0
    log_lines = log_dropped = 0
    for snap in snapshots:
        for route, cls, decision, plan, n in snap.get("requests", ()):
            k = (route, cls, decision, plan)
            requests[k] = requests.get(k, 0) + n
        for route, h in snap.get("latency", {}).items():
            acc = latency.setdefault(route, [0] * len(h))
            for i, v in enumerate(h):
                acc[i] += v
        for target, c in snap.get("upstream", {}).items():
            acc = upstream.setdefault(target, [0, 0, 0])
            for i, v in enumerate(c):
                acc[i] += v
        for target, n in snap.get("idle", {}).items():
            idle[target] = idle.get(target, 0) + n
        conns += snap.get("connections", 0)
        refused += snap.get("connections_refused", 0)
        cuts += snap.get("upstream_cut", 0)
        lines, dropped = snap.get("access_log", (0, 0))
        log_lines += lines
        log_dropped += dropped

    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {value}")

    metric("fastgate_requests_total", "counter",
           "Requests answered, by route, status class, the stage that decided, and plan.",
           [(_labels(route=r, status=f"{c}xx" if c else "none", decision=d, plan=p), n)
            for (r, c, d, p), n in sorted(requests.items())])
    out.append("# HELP fastgate_request_duration_seconds Time from the request head to the end of the response.")
    out.append("# TYPE fastgate_request_duration_seconds histogram")
    for route, h in sorted(latency.items()):
        cum = 0
        for bound, n in zip(LATENCY_BUCKETS, h):
            cum += n
            out.append(f"fastgate_request_duration_seconds_bucket{_labels(route=route, le=repr(bound))} {cum}")
        cum += h[len(LATENCY_BUCKETS)]
        out.append(f'fastgate_request_duration_seconds_bucket{_labels(route=route, le="+Inf")} {cum}')
        out.append(f"fastgate_request_duration_seconds_sum{_labels(route=route)} {h[-1]:.6f}")
        out.append(f"fastgate_request_duration_seconds_count{_labels(route=route)} {cum}")
    metric("fastgate_upstream_connects_total", "counter", "New connections opened to an upstream target.",
           [(_labels(target=t), c[0]) for t, c in sorted(upstream.items())])
    metric("fastgate_upstream_reuses_total", "counter", "Requests sent on a pooled keep-alive connection.",
           [(_labels(target=t), c[1]) for t, c in sorted(upstream.items())])
    metric("fastgate_upstream_connect_errors_total", "counter", "Failed connection attempts to an upstream target.",
           [(_labels(target=t), c[2]) for t, c in sorted(upstream.items())])
    metric("fastgate_upstream_idle_connections", "gauge", "Pooled idle keep-alive connections per target.",
           [(_labels(target=t), n) for t, n in sorted(idle.items())])
    metric("fastgate_client_connections", "gauge", "Open client connections over all workers.", [("", conns)])
    metric("fastgate_connections_refused_total", "counter",
           "Client connections refused with 503 at a worker's max_connections (no idle one left to close).",
           [("", refused)])
    metric("fastgate_upstream_cut_total", "counter",
           "Responses an upstream cut or reset after their head reached the client.", [("", cuts)])
    metric("fastgate_access_log_lines_total", "counter", "Access-log lines written.", [("", log_lines)])
    metric("fastgate_access_log_dropped_total", "counter", "Access-log lines lost to failed writes.",
           [("", log_dropped)])
    metric("fastgate_keys_loaded", "gauge", "Keys in the shared key table.", [("", keys_stats.get("live", 0))])
    metric("fastgate_key_table_capacity", "gauge", "Keys the shared table can hold.", [("", key_capacity)])
    used = rate_stats.get("used", rate_stats.get("entries", 0))
    metric("fastgate_rate_table_used", "gauge", "Address subjects (route ip_limits) with counters.", [("", used)])
    metric("fastgate_rate_table_capacity", "gauge", "Address subjects (route ip_limits) the shared table can hold.",
           [("", rate_capacity)])
    metric("fastgate_auth_table_used", "gauge", "Failed-auth address subjects with counters (the stalest is evicted).",
           [("", rate_stats.get("auth_used", 0))])
    metric("fastgate_rate_evictions_total", "counter", "Failed-auth subjects evicted to make room.",
           [("", rate_stats.get("evicted", 0))])
    m = master or {}
    metric("fastgate_workers", "gauge", "Worker processes configured.", [("", m.get("workers", 0))])
    metric("fastgate_worker_restarts_total", "counter", "Workers (and admin processes) restarted after a crash.",
           [("", m.get("worker_restarts", 0))])
    metric("fastgate_draining", "gauge", "1 while the gateway drains for shutdown.", [("", int(bool(m.get("draining"))))])
    return "\n".join(out) + "\n"
