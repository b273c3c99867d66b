"""Measures revocation propagation over a 3-node cluster: from the revoke API answer to refusal on every node.

Starts a throwaway PostgreSQL (tests/pg_kit.py: initdb in a temp dir; or --store URL of an
empty database you provide), the test upstream, and N nodes (`fastgate run`, one worker
each, tests/cluster_kit.py) on loopback. Then, for each of --revocations rounds: a key is
created on one node and probed until every node serves it; a probe thread per node sends
requests with it back to back (keep-alive); the key is revoked through the admin API of
node (round mod N); each probe records when its node first refuses the key.

Figures (milliseconds, p50 / p99 / max over all rounds and nodes; times are when a probe
request was *sent*, so a figure is exact to one probe round trip):

    revoke call        the admin API call (store commit + every live node's ack)
    answer->refusal    from the answer to the first refused request on a node, 0 if it was
                       sent before the answer: with acks, at most the one probe round trip
                       that was in flight when the answer came
    sent->refusal      from sending the revoke to the first refused request on a node: the
                       propagation itself (commit, NOTIFY, the node's read and apply)
    refused before answer   share of (round, node) pairs already refusing at the answer
    succeeded after answer  requests sent after the answer that still got 200 (must be 0)

    python bench/macro/propagation.py                      # 200 revocations, 3 nodes
    python bench/macro/propagation.py -n 1000 --json       # the issue's 1,000
    python bench/macro/propagation.py --store postgresql://fastgate@db/empty_db --nodes 3

Short by default (a few seconds of set-up and ~20 ms per round); the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster_kit import Node, node_config  # noqa: E402
from conftest import READY_TIMEOUT, Upstream, _readline_with_deadline  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def start_upstream() -> tuple[subprocess.Popen, Upstream]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "upstream_app.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    m, _ = _readline_with_deadline(proc, time.monotonic() + READY_TIMEOUT, r"PORTS (\d+) (\d+)")
    return proc, Upstream(proc, int(m.group(1)), int(m.group(2)))


def probe(node: Node, key: str, go: threading.Event, out: dict, deadline: float) -> None:
    """Requests with ``key`` back to back until one is refused: out[node] = (send time of the
    last request that succeeded, send time of the first one refused)."""
    import http.client

    host, port = node.url.rsplit("/", 1)[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=5)  # lighter than httpx: a tighter probe
    last_ok = 0.0
    try:
        go.wait(5)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            c.request("GET", "/echo/x", headers={"x-api-key": key})
            resp = c.getresponse()
            resp.read()
            if resp.status != 200:
                out[node.node_id] = (last_ok, t)
                return
            last_ok = t
    finally:
        c.close()


def run(nodes: list[Node], rounds: int) -> dict:
    calls: list[float] = []
    after: list[float] = []
    sent_to: list[float] = []
    before = late = 0
    for i in range(rounds):
        made = nodes[(i + 1) % len(nodes)].admin("POST", "/keys", json={"name": f"p{i}"}, expect=201).json()
        t_end = time.monotonic() + 10
        while any(n.get(made["key"]) != 200 for n in nodes):
            if time.monotonic() > t_end:
                raise RuntimeError(f"key {made['id']} did not reach every node")
            time.sleep(0.002)
        refused: dict[str, float] = {}
        go = threading.Event()
        deadline = time.perf_counter() + 10
        threads = [threading.Thread(target=probe, args=(n, made["key"], go, refused, deadline)) for n in nodes]
        for t in threads:
            t.start()
        go.set()
        time.sleep(0.002)  # the probes are sending
        t_sent = time.perf_counter()
        r = nodes[i % len(nodes)].admin("POST", f"/keys/{made['id']}/revoke", expect=200).json()
        t_answer = time.perf_counter()
        for t in threads:
            t.join(15)
        if r.get("missing"):
            print(f"round {i}: missing acks from {r['missing']}", file=sys.stderr)
        calls.append((t_answer - t_sent) * 1000)
        for n in nodes:
            if n.node_id not in refused:
                raise RuntimeError(f"{n.node_id} never refused revoked key {made['id']}")
            last_ok, first_refused = refused[n.node_id]
            after.append(max(0.0, first_refused - t_answer) * 1000)
            sent_to.append((first_refused - t_sent) * 1000)
            before += first_refused <= t_answer
            late += last_ok > t_answer  # a request sent after the answer succeeded: must never happen
    fig = {}
    for name, vals in (("revoke_call_ms", calls), ("answer_to_refusal_ms", after), ("sent_to_refusal_ms", sent_to)):
        fig[name] = {"p50": round(pct(vals, 50), 3), "p99": round(pct(vals, 99), 3), "max": round(max(vals), 3),
                     "mean": round(statistics.fmean(vals), 3)}
    fig["refused_before_answer"] = round(before / len(after), 4)
    fig["succeeded_after_answer"] = late
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--revocations", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--store", help="postgresql:// URL of an empty database (default: a throwaway server)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    pg = None
    up_proc = None
    nodes: list[Node] = []
    with tempfile.TemporaryDirectory(prefix="fastgate-prop-") as tmp:
        try:
            if args.store:
                url = args.store
            else:
                from pg_kit import PgServer

                pg = PgServer()
                url = pg.new_database()
            up_proc, upstream = start_upstream()
            for i in range(args.nodes):
                nid = f"bench-{i + 1}"
                nodes.append(Node(Path(tmp) / nid, node_config(upstream, url, nid, capacity=args.revocations + 64),
                                  nid))
            for n in nodes:
                n.start(wait_ready=False)
            for n in nodes:
                n.wait_ready()
            t_end = time.monotonic() + 10  # every node sees the others' heartbeats
            while any(n.ready().json()["cluster"]["peers_live"] < args.nodes - 1 for n in nodes):
                if time.monotonic() > t_end:
                    raise RuntimeError("the nodes do not see each other")
                time.sleep(0.05)
            t0 = time.monotonic()
            fig = run(nodes, args.revocations)
            fig.update(revocations=args.revocations, nodes=args.nodes, seconds=round(time.monotonic() - t0, 1))
        finally:
            for n in nodes:
                n.stop()
            if up_proc is not None:
                up_proc.stdin.close()
                up_proc.wait(5)
            if pg is not None:
                pg.close()
    if args.json:
        print(json.dumps(fig, indent=2))
    else:
        print(f"{args.revocations} revocations over {args.nodes} nodes ({fig['seconds']} s)")
        for name in ("revoke_call_ms", "answer_to_refusal_ms", "sent_to_refusal_ms"):
            f = fig[name]
            print(f"  {name:22} p50 {f['p50']:8.3f}  p99 {f['p99']:8.3f}  max {f['max']:8.3f}")
        print(f"  refused before answer  {fig['refused_before_answer']:.1%} of (round, node) pairs")
        print(f"  succeeded after answer {fig['succeeded_after_answer']} requests (must be 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
