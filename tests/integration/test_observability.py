"""Metrics, per-key usage rollups and health over a real 2-worker gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN, basic_config

EXTRA = """
[keys]
store = "keys.db"
[plans.free]
limits = ["1000/second"]
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
[[routes]]
name = "keyed-status"
path = "/status"
upstream = "app"
auth = "key"
"""


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    return pred()


def test_usage_and_metrics_match_the_traffic(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream, extra=EXTRA), workers=2)
    a = gw.admin("POST", "/keys", json={"name": "a", "plan": "free"}, expect=201).json()
    b = gw.admin("POST", "/keys", json={"name": "b"}, expect=201).json()
    traffic = [(a, "/echo/x", 200)] * 5 + [(a, "/status/404", 404)] * 3 + [(a, "/status/503", 503)] * 2
    traffic += [(b, "/echo/y", 200)] * 4
    for key, path, status in traffic:
        # A fresh connection per request spreads the traffic over both workers.
        r = httpx.get(gw.url + path, headers={"x-api-key": key["key"]}, timeout=5)
        assert r.status_code == status
    for _ in range(3):
        assert httpx.get(gw.url + "/echo/nokey", timeout=5).status_code == 401
    assert httpx.get(gw.url + "/bytes/10", timeout=5).status_code == 200

    def usage(key):
        return gw.admin("GET", f"/keys/{key['id']}/usage?by=minute", expect=200).json()["totals"]

    def settled(fn, key, want):
        t = fn(key)
        return t if t["requests"] == want else None

    ta = _wait(lambda: settled(usage, a, 10))
    assert ta and (ta["2xx"], ta["4xx"], ta["5xx"]) == (5, 3, 2), usage(a)
    assert ta["bytes_out"] > 0
    tb = _wait(lambda: settled(usage, b, 4))
    assert tb and tb["2xx"] == 4
    for by in ("hour", "day"):
        t = gw.admin("GET", f"/keys/{a['id']}/usage?by={by}", expect=200).json()["totals"]
        assert t["requests"] == 10
    top = gw.admin("GET", "/usage/top?n=10", expect=200).json()["top"]
    assert [(r["key_id"], r["requests"]) for r in top] == [(a["id"], 10), (b["id"], 4)]

    # The CLI reads the same numbers.
    env = {"FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "fastgate", "usage", "--admin", gw.admin_url, "--key", a["id"],
                          "--by", "minute", "--json"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["totals"]["requests"] == 10
    out = subprocess.run([sys.executable, "-m", "fastgate", "usage", "--admin", gw.admin_url, "--top", "1"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0 and a["id"] in out.stdout and b["id"] not in out.stdout

    def metrics():
        r = httpx.get(gw.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    def total(text, **match):
        n = 0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "fastgate_requests_total" and all(s.labels.get(k) == v for k, v in match.items()):
                    n += s.value
        return n

    def settled_metrics():
        t = metrics()
        return t if total(t) == 18 else None

    text = _wait(settled_metrics)
    assert text, metrics()
    assert total(text, route="keyed", status="2xx", decision="proxied", plan="free") == 5
    assert total(text, route="keyed", status="4xx", decision="key") == 3
    assert total(text, route="keyed-status", status="5xx", decision="proxied") == 2
    assert total(text, route="app", status="2xx") == 1
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    hist = fams["fastgate_request_duration_seconds"]
    counts = {s.labels["route"]: s.value for s in hist.samples if s.name.endswith("_count")}
    assert counts["keyed"] == 12 and counts["keyed-status"] == 5  # 5 + 4 proxied, 3 refused
    assert fams["fastgate_keys_loaded"].samples[0].value == 2
    assert fams["fastgate_workers"].samples[0].value == 2
    assert fams["fastgate_worker_restarts"].samples[0].value == 0
    up = {s.labels["target"]: s.value for s in fams["fastgate_upstream_connects"].samples}
    assert up[upstream.addr] >= 1
    assert a["id"] not in text and a["key"] not in text  # never a key id as a label


def test_health_and_readiness(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream, extra=EXTRA), workers=2)
    assert httpx.get(gw.admin_url + "/healthz", timeout=5).json()["status"] == "ok"
    def ready():
        x = httpx.get(gw.admin_url + "/readyz", timeout=5)
        return x if x.status_code == 200 else None

    r = _wait(ready)
    assert r and r.json()["status"] == "ready"
    # /metrics needs the admin token like everything but health.
    assert httpx.get(gw.admin_url + "/metrics", timeout=5).status_code == 401
