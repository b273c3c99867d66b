"""Hardening, family 9: slow and silent clients (issue 9, must-have 9). A
connection that never sent a byte, or an idle keep-alive one, is closed
silently; a head that does not complete gets 408; a trickling body gets 408
within one body_timeout window and never holds an upstream connection."""

from __future__ import annotations

import threading
import time

import pytest

from hardening_kit import Client, Harness, marker

TIMEOUT = 0.5
SLACK = 1.5  # the sweep runs every tick; loaded CI machines add more


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("slow"), server=f"""
        header_timeout = {TIMEOUT}
        body_timeout = {TIMEOUT}
        keepalive_timeout = {TIMEOUT}
        """)
    yield harness
    harness.stop()


def test_a_connection_that_never_sends_a_byte_is_closed_silently(h):
    c = Client(h.port)
    t0 = time.monotonic()
    assert c.wait_closed(TIMEOUT + SLACK)
    assert time.monotonic() - t0 >= TIMEOUT * 0.8
    assert c.buf == b"", "an unsolicited reply on a connection that asked nothing"
    c.close()


def test_an_idle_keepalive_connection_is_closed_silently(h):
    c = Client(h.port)
    c.send(b"GET /idle HTTP/1.1\r\nHost: gw\r\n\r\n")
    (r,) = c.read(1)
    assert r.status == 200
    assert c.wait_closed(TIMEOUT + SLACK)
    assert c.buf == b"", "an unsolicited 408 a reusing client could take for its next answer"
    c.close()


def test_an_unfinished_head_gets_408(h):
    mark = marker()
    c = Client(h.port)
    c.send(f"GET /{mark} HTTP/1.1\r\nHost: gw\r\nX-A: b".encode())
    (r,) = c.read(1, timeout=TIMEOUT + SLACK)
    assert (r.status, r.code) == (408, "request_timeout")
    assert c.wait_closed()
    c.close()
    assert not h.up.saw(mark)


def trickle(port: int, mark: str, out: dict) -> None:
    c = Client(port)
    t0 = time.monotonic()
    try:
        c.send(f"POST /{mark} HTTP/1.1\r\nHost: gw\r\nContent-Length: 10000\r\n\r\n".encode())
        while not c.closed and time.monotonic() - t0 < 10:
            try:
                c.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            c._recv(time.monotonic() + 0.1)
        replies = c.read(1, timeout=0.5)
        out[mark] = (time.monotonic() - t0, replies[0].status if replies else None)
    finally:
        c.close()


def test_a_trickling_body_gets_408_within_one_window(h):
    mark = marker()
    out = {}
    trickle(h.port, mark, out)
    elapsed, status = out[mark]
    assert status == 408
    assert elapsed < TIMEOUT + SLACK
    assert not h.up.saw(mark)


def test_many_trickling_clients_hold_no_upstream_connection(h):
    marks = [marker() for _ in range(30)]
    out = {}
    threads = [threading.Thread(target=trickle, args=(h.port, m, out)) for m in marks]
    for t in threads:
        t.start()
    time.sleep(TIMEOUT / 2)
    # while they trickle, none of them has reached the upstream
    assert not any(h.up.saw(m) for m in marks)
    for t in threads:
        t.join(15)
    assert sorted(s for _, s in out.values()) == [408] * 30
    assert not any(h.up.saw(m) for m in marks)
    assert h.get("/after-trickle").status == 200


def test_a_steady_body_is_not_cut(h):
    mark = marker()
    c = Client(h.port)
    c.send(f"POST /{mark} HTTP/1.1\r\nHost: gw\r\nContent-Length: 4000\r\n\r\n".encode())
    for _ in range(8):
        time.sleep(TIMEOUT / 4)
        c.send(b"b" * 500)
    (r,) = c.read(1)
    c.close()
    assert r.status == 200 and r.json()["body_bytes"] == 4000
