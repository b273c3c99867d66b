"""Proxying through a real 2-worker gateway to a real (aiohttp) upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import requests

from conftest import basic_config, raw_exchange


_leftover: dict[int, bytes] = {}


def _read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, dict, bytes]:
    """Read one Content-Length response off a keep-alive socket, keeping any
    bytes of the next (pipelined) response for the next call."""
    sock.settimeout(timeout)
    buf = _leftover.pop(sock.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a full head: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        k, v = line.split(b":", 1)
        headers[k.strip().lower()] = v.strip()
    n = int(headers[b"content-length"])
    while len(rest) < n:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    _leftover[sock.fileno()] = rest[n:]
    return lines[0], headers, rest[:n]


def test_get_with_two_real_clients(gateway):
    r1 = httpx.get(gateway.url + "/echo/a?x=1", timeout=5)
    r2 = requests.get(gateway.url + "/echo/a?x=1", timeout=5)
    for r in (r1, r2):
        assert r.status_code == 200
        body = r.json()
        assert body["path"] == "/echo/a" and body["query"] == "x=1"
        assert r.headers["x-upstream"] == "yes"
        assert r.headers["x-request-id"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_post_and_expect_continue(gateway):
    # curl sends Expect: 100-continue for bodies over 1 MiB.
    payload = b"z" * (2 * 1024 * 1024)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-H", "Expect: 100-continue", "--data-binary", "@-",
         gateway.url + "/echo/upload"],
        input=payload, capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["body_bytes"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert "expect" not in {k.lower() for k, _ in body["headers"]}


def test_expect_continue_raw(gateway):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        s.sendall(b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = s.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        status, headers, body = _read_response(s)
        assert status.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["body_bytes"] == 5
    finally:
        s.close()


def test_keep_alive_and_pipelining(gateway):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        # Keep-alive: three sequential requests on one connection.
        for i in range(3):
            s.sendall(b"GET /echo/ka%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            status, _, body = _read_response(s)
            assert status.startswith(b"HTTP/1.1 200")
            assert json.loads(body)["path"] == "/echo/ka%d" % i
        # Pipelining: five requests in one write, answered in order; a POST
        # with a body in the middle.
        reqs = b"".join(
            b"GET /echo/p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i if i != 2
            else b"POST /echo/p2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            for i in range(5)
        )
        s.sendall(reqs)
        for i in range(5):
            status, _, body = _read_response(s)
            data = json.loads(body)
            assert data["path"] == "/echo/p%d" % i
            assert data["body_bytes"] == (3 if i == 2 else 0)
    finally:
        s.close()


def test_http10_with_and_without_keep_alive(gateway):
    out = raw_exchange(gateway.port, b"GET /echo/10 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in out.lower()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        for _ in range(2):
            s.sendall(b"GET /echo/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = _read_response(s)
            assert status.startswith(b"HTTP/1.1 200")
            assert headers[b"connection"].lower() == b"keep-alive"
    finally:
        s.close()


def test_http10_client_gets_close_delimited_body_for_chunked_upstream(gateway):
    out = raw_exchange(gateway.port, b"GET /bytes/100000?chunked=1 HTTP/1.0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower()
    assert len(body) == 100_000


def test_chunked_request_body_past_request_buffer_is_streamed_upstream(gateway):
    # 100 kB in 20 pieces, with a pause once past the 64 KiB request_buffer:
    # the upstream is already receiving (re-chunked by the gateway) while the
    # client is still sending.
    def gen():
        for i in range(20):
            if i == 15:
                time.sleep(0.3)
            yield bytes([i]) * 5000

    r = requests.post(gateway.url + "/echo/chunked", data=gen(), timeout=10)
    body = r.json()
    expected = b"".join(bytes([i]) * 5000 for i in range(20))
    assert body["body_bytes"] == len(expected)
    assert body["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert body["chunked"] is True


def test_small_chunked_request_body_is_buffered_and_sent_with_a_length(gateway):
    # Within request_buffer the body is read and validated whole first, and
    # the upstream gets it with a Content-Length (as nginx sends a buffered body).
    def gen():
        for i in range(10):
            yield bytes([i]) * 1000

    r = requests.post(gateway.url + "/echo/chunked", data=gen(), timeout=10)
    body = r.json()
    assert body["body_bytes"] == 10_000 and body["chunked"] is False
    assert {k.lower(): v for k, v in body["headers"]}["content-length"] == "10000"


def test_chunked_response(gateway):
    out = raw_exchange(gateway.port, b"GET /bytes/200000?chunked=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"0\r\n\r\n")
    r = httpx.get(gateway.url + "/bytes/200000?chunked=1", timeout=10)
    assert len(r.content) == 200_000


def _worker_peak_rss_kb(gateway) -> int:
    peak = 0
    for pid in gateway.worker_pids():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak


def test_50mb_upload_and_download_stream_with_bounded_rss(gateway):
    size = 50 * 1024 * 1024
    before = _worker_peak_rss_kb(gateway)
    block = bytes(range(256)) * 4096  # 1 MiB

    class Body:  # iterable with a length: requests streams it with Content-Length
        def __len__(self):
            return size

        def __iter__(self):
            for _ in range(size // len(block)):
                yield block

    r = requests.post(gateway.url + "/echo/big", data=Body(), timeout=60)
    assert r.json()["body_bytes"] == size
    h = hashlib.sha256()
    n = 0
    with httpx.stream("GET", gateway.url + f"/bytes/{size}", timeout=60) as resp:
        for chunk in resp.iter_raw():
            n += len(chunk)
            h.update(chunk)
    assert n == size
    after = _worker_peak_rss_kb(gateway)
    # Streaming means the peak grows by buffers, not by the 50 MB body.
    assert after - before < 20 * 1024, (before, after)


def test_sse_events_arrive_incrementally(gateway):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        t0 = time.monotonic()
        s.sendall(b"GET /sse?n=3&interval=0.7 HTTP/1.1\r\nHost: a\r\n\r\n")
        buf = b""
        while b"event 0" not in buf:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        first = time.monotonic() - t0
        assert b"event 1" not in buf
        while b"0\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        total = time.monotonic() - t0
        assert first < 0.6 and total >= 1.3, (first, total)
        assert b"event 2" in buf
    finally:
        s.close()


def test_upstream_down_is_502(start_gateway, upstream):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()
    gw = start_gateway(basic_config(upstream).replace(upstream.addr, f"127.0.0.1:{dead_port}"))
    r = httpx.get(gw.url + "/echo", timeout=5)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_unavailable"
    assert err["request_id"] == r.headers["x-request-id"]


def test_slow_upstream_is_504(start_gateway, upstream):
    gw = start_gateway(basic_config(upstream, upstream_extra="read_timeout = 0.5"))
    t0 = time.monotonic()
    r = httpx.get(gw.url + "/slow?delay=3", timeout=10)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 2.5


def test_upstream_closing_mid_body_never_looks_complete(gateway):
    for query in ("", "?chunked=1"):
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            requests.get(gateway.url + "/truncate" + query, timeout=10).content
        out = raw_exchange(gateway.port, b"GET /truncate%s HTTP/1.1\r\nHost: a\r\n\r\n" % query.encode())
        head, body = out.split(b"\r\n\r\n", 1)
        if query:
            assert not body.endswith(b"0\r\n\r\n")
        else:
            assert len(body) < 100_000


def test_dead_pooled_connection_is_retried_for_idempotent_requests(gateway):
    # The flaky upstream answers the first request of a connection and drops
    # the second: the pooled connection is dead, the gateway retries on a fresh one.
    with httpx.Client(timeout=5) as c:
        for _ in range(4):
            r = c.get(gateway.url + "/flaky")
            assert r.status_code == 200, r.text
            assert r.json()["flaky"] is True


def test_non_idempotent_request_is_not_retried(gateway):
    # Head and body in one write, so the body is complete before the upstream
    # answers (an upstream that answers before the body is in cannot be pooled,
    # and a client that sends the body late would then never reuse it).
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        post = b"POST /flaky HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        s.sendall(post)
        status, _, _ = _read_response(s)
        assert status.startswith(b"HTTP/1.1 200")
        # The pooled connection is dead now: a POST may have been acted on, so
        # it is not retried and the client gets the 502.
        s.sendall(post)
        status, _, body = _read_response(s)
        assert status.startswith(b"HTTP/1.1 502"), body
        assert json.loads(body)["error"]["code"] == "upstream_unavailable"
    finally:
        s.close()


def test_head_and_no_body_statuses(gateway):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    try:
        s.sendall(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: a\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        assert buf.startswith(b"HTTP/1.1 200") and b"content-length: 5000" in buf.lower()
        assert buf.endswith(b"\r\n\r\n")
        for code in (204, 304):
            s.sendall(b"GET /status/%d HTTP/1.1\r\nHost: a\r\n\r\n" % code)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(4096)
            assert buf.startswith(b"HTTP/1.1 %d" % code)
        # The connection is still usable afterwards.
        s.sendall(b"GET /echo/after HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = _read_response(s)
        assert json.loads(body)["path"] == "/echo/after"
    finally:
        s.close()


def test_websocket_passthrough(gateway):
    aiohttp = pytest.importorskip("aiohttp")

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(gateway.url + "/ws") as ws:
                await ws.send_str("hi")
                msg = await ws.receive(timeout=5)
                assert msg.data == "echo:hi"
                await ws.send_bytes(b"\x00\x01" * 1000)
                msg = await ws.receive(timeout=5)
                assert msg.data == b"\x00\x01" * 1000

    asyncio.run(run())
