"""Counters never go backwards: a killed or retired worker's totals stay in /metrics.

Through the real 2-worker gateway, a poller scrapes /metrics all along and
checks that every counter sample (``*_total``, and the histogram's buckets,
count and sum) never decreases and never disappears.

The bound on what a SIGKILL may lose: a worker publishes its counts about once
a second, so the counts it made after its last publish die with it. The test
makes that window measurable instead of timing it: it pauses the load and waits
until /metrics equals what the client received (everything published), resumes,
kills a worker, and pauses the load again (so every response the dead worker
sent has reached the client). Whatever the dead worker counted but never
published was served between those two pauses, so the loss is at most the
responses the client got between them; without carrying, the loss is the dead
worker's whole share since the start, several times larger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN, READY_TIMEOUT, _readline_with_deadline, basic_config, raw_exchange, wait_port, wait_for

THREADS = 4


def scrape(admin_url: str) -> dict:
    """{(sample name, labels): value} for every counter-like sample."""
    r = httpx.get(admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        if fam.type not in ("counter", "histogram"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_total(sample: dict) -> float:
    return sum(v for (name, _), v in sample.items() if name == "fastgate_requests_total")


class Poller(threading.Thread):
    """Scrapes /metrics until stopped; records every counter that went down or vanished."""

    def __init__(self, admin_url: str):
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.stop = threading.Event()
        self.last: dict = {}
        self.polls = 0
        self.violations: list = []

    def run(self):
        while not self.stop.is_set():
            try:
                now = scrape(self.admin_url)
            except httpx.HTTPError:
                continue
            for k, v in self.last.items():
                if k not in now:
                    self.violations.append(("vanished", k, v))
                elif now[k] < v:
                    self.violations.append(("decreased", k, v, now[k]))
            self.last = {**self.last, **now}
            self.polls += 1
            self.stop.wait(0.05)


class Load:
    """THREADS keep-alive clients that reconnect every few requests, so both workers get traffic."""

    def __init__(self, url: str):
        self.url = url
        self.go = threading.Event()
        self.quit = threading.Event()
        self.idle = [threading.Event() for _ in range(THREADS)]
        self.done: list[float] = []  # monotonic time of each 200 received
        self.errors: list = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)]

    def _run(self, i: int):
        client = None
        n = 0
        while not self.quit.is_set():
            if not self.go.is_set():
                self.idle[i].set()
                self.go.wait(0.05)
                continue
            self.idle[i].clear()
            if client is None or n % 5 == 0:
                if client is not None:
                    client.close()
                client = httpx.Client(timeout=5)
            n += 1
            try:
                r = client.get(self.url + "/echo/count")
                with self.lock:
                    if r.status_code == 200:
                        self.done.append(time.monotonic())
                    else:
                        self.errors.append(r.status_code)
            except httpx.HTTPError as exc:
                with self.lock:
                    self.errors.append(repr(exc))
                client.close()
                client = None
        if client is not None:
            client.close()

    def start(self):
        for t in self.threads:
            t.start()

    def pause(self):
        self.go.clear()
        for e in self.idle:
            assert e.wait(10)

    def served(self, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t in self.done if t >= since)

    def close(self):
        self.go.clear()
        self.quit.set()
        for t in self.threads:
            t.join(10)


def _settle(admin_url: str, want: float, timeout: float = 10.0) -> float:
    """Poll until /metrics counts `want` requests (workers publish ~once a second)."""
    got = wait_for(lambda: (t := requests_total(scrape(admin_url))) == want and t, timeout, 0.1)
    return got if got else requests_total(scrape(admin_url))


def test_killed_worker_totals_are_carried_forward(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream), workers=2)
    poller = Poller(gw.admin_url)
    load = Load(gw.url)
    base = requests_total(scrape(gw.admin_url))
    poller.start()
    load.start()
    try:
        load.go.set()
        assert wait_for(lambda: load.served() >= 400, 30)
        load.pause()
        n1 = load.served()
        assert _settle(gw.admin_url, base + n1) == base + n1  # all published: the sync point
        sync = time.monotonic()

        victims = gw.worker_pids()
        assert len(victims) == 2
        load.go.set()
        assert wait_for(lambda: load.served() >= n1 + 20, 30, 0.005)
        os.kill(victims[0], signal.SIGKILL)
        # Every response the dead worker sent is in the client's hands once the
        # clients are idle: this window holds all it may have left unpublished.
        load.pause()
        window = load.served(since=sync)
        replaced = wait_for(lambda: (p := gw.worker_pids()) and len(p) == 2 and victims[0] not in p, 15)
        assert replaced, gw.log()
        # Load on the replacement too, then stop and let the workers publish.
        load.go.set()
        target = load.served() + 150
        assert wait_for(lambda: load.served() >= target, 30)
        load.pause()
        total_ok = load.served()
        errors = list(load.errors)
        time.sleep(1.5)  # more than a publish interval
        final = requests_total(scrape(gw.admin_url)) - base
    finally:
        load.close()
        poller.stop.set()
        poller.join(10)

    assert poller.polls >= 10
    assert poller.violations == []
    # Without carrying, the dead worker's whole share (about n1 / 2) would be missing.
    assert final >= total_ok - window, (final, total_ok, window, n1)
    # Nor is anything counted twice: every count is a response the client saw or an
    # exchange cut by the kill (at most one in flight per client thread).
    assert final <= total_ok + len(errors), (final, total_ok, errors)
    assert len(errors) <= THREADS, errors
    assert "killed by SIGKILL" in gw.log()


def _start_without_workers_flag(config_path, log_path):
    """`fastgate run` whose worker count comes from the file, so a reload can change it
    (the --workers flag would win over the file)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "--config", str(config_path),
             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log, cwd=str(config_path.parent),
            env={**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        )
    m, banner = _readline_with_deadline(proc, time.monotonic() + READY_TIMEOUT,
                                        r"listening on http://127\.0\.0\.1:(\d+)")
    port = int(m.group(1))
    admin = [x.split("admin API on ")[1].split()[0] for x in banner if "admin API on " in x]
    if not admin:
        m2, _ = _readline_with_deadline(proc, time.monotonic() + 10, r"admin API on (http://\S+)")
        admin = [m2.group(1)]
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}", admin[0]


def test_reload_that_retires_workers_keeps_their_totals(tmp_path, upstream):
    config = basic_config(upstream)
    path = tmp_path / "gateway.toml"
    path.write_text(config.replace("[server]\n", "[server]\nworkers = 3\n", 1))
    proc, url, admin_url = _start_without_workers_flag(path, tmp_path / "gateway.log")
    try:
        base = requests_total(scrape(admin_url))
        port = int(url.rsplit(":", 1)[1])
        n = 0
        for i in range(60):  # fresh connections: spread over the three workers
            out = raw_exchange(port, b"GET /echo/retire HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 "), out[:200]
            n += 1
        assert _settle(admin_url, base + n) == base + n
        before = scrape(admin_url)
        path.write_text(config.replace("[server]\n", "[server]\nworkers = 1\n", 1))
        proc.send_signal(signal.SIGHUP)

        def one_worker():
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
            return len(out.stdout.split()) == 2  # one worker + the admin process

        assert wait_for(one_worker, 15)
        after = scrape(admin_url)
        for k, v in before.items():
            assert after.get(k, -1) >= v, (k, v, after.get(k))
        assert requests_total(after) == base + n
        assert httpx.get(url + "/echo/retire", timeout=5).status_code == 200
        assert _settle(admin_url, base + n + 1) == base + n + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
