"""The process model: drain on SIGTERM, reload on SIGHUP, worker replacement."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT, _readline_with_deadline, basic_config, wait_for


def test_sigterm_drains_in_flight_requests(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream), workers=2)
    results = []

    def slow_call():
        try:
            results.append(httpx.get(gw.url + "/slow?delay=1.5", timeout=10).status_code)
        except Exception as exc:  # recorded, asserted below
            results.append(repr(exc))

    threads = [threading.Thread(target=slow_call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the requests are in flight at the upstream
    gw.signal(signal.SIGTERM)
    for t in threads:
        t.join(15)
    assert results == [200, 200, 200, 200]
    assert gw.proc.wait(15) == 0
    # Nothing listens any more.
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/echo", timeout=2)


def test_drain_is_bounded_by_drain_timeout(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream).replace("drain_timeout = 10.0", "drain_timeout = 0.5"))
    result = []
    t = threading.Thread(target=lambda: result.append(_try_get(gw.url + "/slow?delay=5")))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(10) == 0
    assert time.monotonic() - t0 < 4
    t.join(10)
    assert result and result[0] != 200


def _try_get(url):
    try:
        return httpx.get(url, timeout=10).status_code
    except Exception as exc:
        return repr(exc)


def test_sighup_reload_under_load_has_zero_failures(start_gateway, upstream):
    config = basic_config(upstream)
    gw = start_gateway(config, workers=2)
    stop = threading.Event()
    failures: list = []
    counts = [0, 0, 0, 0]

    def load(i):
        # Keep-alive clients and one-shot clients both.
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.get(gw.url + "/echo/load") if i % 2 else httpx.get(gw.url + "/echo/load", timeout=5)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                    counts[i] += 1
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert httpx.get(gw.url + "/v2/echo/x", timeout=5).status_code == 404  # upstream has no /v2
        new = config + (
            '\n[[routes]]\nname = "v2"\npath = "/v2"\nupstream = "app"\nauth = "none"\nstrip_path = true\n'
        )
        for _ in range(3):
            gw.config_path.write_text(new)
            gw.signal(signal.SIGHUP)
            time.sleep(0.4)
            gw.config_path.write_text(config)
            gw.signal(signal.SIGHUP)
            time.sleep(0.4)
        gw.config_path.write_text(new)
        gw.signal(signal.SIGHUP)
        # The new route applies: strip_path removes '/v2'.
        assert wait_for(lambda: httpx.get(gw.url + "/v2/echo/x", timeout=5).status_code == 200, 5)
        assert httpx.get(gw.url + "/v2/echo/x", timeout=5).json()["path"] == "/echo/x"
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert sum(counts) > 50


def test_bad_reload_keeps_running_config(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream))
    gw.config_path.write_text(basic_config(upstream) + '\n[[routes]]\nname = "bad"\npath = "nope"\nupstream = "missing"\n')
    gw.signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in gw.log(), 5), gw.log()
    log = gw.log()
    assert "$.routes[2].path" in log and "$.routes[2].upstream" in log
    assert httpx.get(gw.url + "/echo/still", timeout=5).status_code == 200


def test_killed_worker_is_replaced(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream), workers=2)
    before = gw.worker_pids()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    after = wait_for(lambda: (p := gw.worker_pids()) and len(p) == 2 and before[0] not in p and p, 10)
    assert after and before[1] in after
    assert "worker 0" in gw.log() or "worker 1" in gw.log()
    # Every worker serves: many fresh connections spread over both sockets.
    for _ in range(20):
        assert httpx.get(gw.url + "/echo/after-crash", timeout=5).status_code == 200


def test_embedded_default_starts_and_proxies_to_demo(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastgate", "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--workers", "2", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(tmp_path),
        env={k: v for k, v in os.environ.items() if k != "FASTGATE_ADMIN_TOKEN"},  # use the token file
    )
    try:
        m, lines = _readline_with_deadline(proc, time.monotonic() + 30, r"listening on (http://127\.0\.0\.1:\d+)")
        url = m.group(1)
        assert any("demo upstream" in line for line in lines), lines
        body = httpx.get(url + "/hello?x=1", timeout=5).json()
        assert body["service"] == "fastgate demo upstream"
        assert body["path"] == "/hello"
        assert (tmp_path / "data").is_dir()
        # The key route of the embedded default, with the token it wrote.
        assert httpx.get(url + "/secure/x", timeout=5).status_code == 401
        admin = next(m.group(1) for line in lines if (m := re.search(r"admin API on (http://\S+)", line)))
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        assert oct((tmp_path / "data" / "admin.token").stat().st_mode & 0o777) == "0o600"
        key = httpx.post(admin + "/keys", json={"name": "me", "plan": "demo"}, timeout=5,
                         headers={"Authorization": f"Bearer {token}"}).json()["key"]
        r = httpx.get(url + "/secure/x", headers={"x-api-key": key}, timeout=5)
        assert r.status_code == 200 and r.headers["ratelimit-limit"] == "10"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_python_dash_m_and_console_script_agree():
    out = subprocess.run([sys.executable, "-m", "fastgate", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("fastgate ")


def test_admin_reload_validates_then_applies(start_gateway, upstream):
    config = basic_config(upstream)
    gw = start_gateway(config)
    assert httpx.get(gw.url + "/v3/echo/x", timeout=5).status_code == 404  # the upstream has no /v3
    gw.config_path.write_text(config + '\n[[routes]]\nname = "v3"\npath = "/v3"\nupstream = "app"\nauth = "none"\n'
                              'strip_path = true\n')
    r = gw.admin("POST", "/reload", expect=202)
    assert r.json()["status"] == "reload requested"
    assert wait_for(lambda: httpx.get(gw.url + "/v3/echo/x", timeout=5).status_code == 200, 5)
    # A bad file is refused by the API with every problem, and nothing changes.
    gw.config_path.write_text(config + '\n[[routes]]\nname = "bad"\npath = "x"\nupstream = "nope"\n')
    r = gw.admin("POST", "/reload", expect=400)
    msg = r.json()["error"]["message"]
    assert "$.routes[2].path" in msg and "$.routes[2].upstream" in msg
    assert httpx.get(gw.url + "/v3/echo/x", timeout=5).status_code == 200
