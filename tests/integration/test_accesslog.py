"""The access log through a real 2-worker gateway."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx

from conftest import basic_config

LOG_EXTRA = """
[log]
access = "{path}"
[keys]
store = "keys.db"
[plans.free]
limits = ["100/second"]
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""

FIELDS = {"time", "request_id", "client_ip", "method", "path", "status", "bytes_in", "bytes_out", "total_us"}


def _lines(path, want: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    lines: list[dict] = []
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if len(lines) >= want:
                return lines
        time.sleep(0.1)
    return lines


def test_lines_parse_and_carry_every_field(start_gateway, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    gw = start_gateway(basic_config(upstream, extra=LOG_EXTRA.format(path=log_path)))
    key = gw.admin("POST", "/keys", json={"name": "k", "owner": "acme", "plan": "free"}, expect=201).json()
    ok = httpx.post(gw.url + "/echo/a?secret=query", headers={"x-api-key": key["key"]}, content=b"12345", timeout=5)
    assert ok.status_code == 200
    assert httpx.get(gw.url + "/echo/b", timeout=5).status_code == 401
    assert httpx.get(gw.url + "/bytes/1000", timeout=5).status_code == 200
    lines = _lines(log_path, 3)
    assert len(lines) == 3, lines
    by_id = {line["request_id"]: line for line in lines}
    first = by_id[ok.headers["x-request-id"]]
    assert FIELDS <= set(first)
    assert first["method"] == "POST" and first["path"] == "/echo/a" and first["status"] == 200
    assert first["route"] == "keyed" and first["key_id"] == key["id"]
    assert first["owner"] == "acme" and first["plan"] == "free"
    assert first["bytes_in"] == 5 and first["bytes_out"] == len(ok.content)
    assert first["upstream"] == upstream.addr and first["upstream_us"] >= 0
    assert first["client_ip"] == "127.0.0.1" and first["total_us"] >= first["upstream_us"]
    denied = [line for line in lines if line["status"] == 401][0]
    assert denied["decision"] == "key" and denied["error"] == "key_missing"
    text = log_path.read_text()
    assert key["key"] not in text and "secret=query" not in text  # no key, no query string


def test_sigusr1_reopens_the_file(start_gateway, upstream, tmp_path):
    log_path = tmp_path / "access.log"
    gw = start_gateway(basic_config(upstream, extra=LOG_EXTRA.format(path=log_path)))
    httpx.get(gw.url + "/bytes/10", timeout=5)
    assert len(_lines(log_path, 1)) == 1
    os.rename(log_path, tmp_path / "access.log.1")
    gw.signal(signal.SIGUSR1)
    time.sleep(0.5)
    httpx.get(gw.url + "/bytes/20", timeout=5)
    assert len(_lines(log_path, 1)) == 1
    assert len(_lines(tmp_path / "access.log.1", 1)) == 1


def test_unwritable_log_never_takes_a_worker_down(start_gateway, upstream, tmp_path):
    bad = tmp_path / "no-such-dir" / "access.log"
    gw = start_gateway(basic_config(upstream, extra=LOG_EXTRA.format(path=bad)))
    pids = gw.worker_pids()
    for _ in range(20):
        assert httpx.get(gw.url + "/bytes/10", timeout=5).status_code == 200
    time.sleep(0.5)
    assert gw.worker_pids() == pids
    assert gw.log().count("access log") >= 1  # reported, once per worker, not per request
    assert gw.log().count("access log") <= 2 * len(pids)
