"""Hardening, family 11: a connection cap (issue 9, must-have 11). At the cap
the oldest idle keep-alive connections are closed first; with none idle, new
connections are refused with 503 overloaded, counted and logged."""

from __future__ import annotations

import time

import pytest

from hardening_kit import Client, Harness

CAP = 20


@pytest.fixture
def h(tmp_path):
    # one worker, so the cap is the gateway's
    harness = Harness(tmp_path, server=f"max_connections = {CAP}", workers=1)
    yield harness
    harness.stop()


def test_oldest_idle_connections_make_room(h):
    idle = []
    for i in range(CAP):
        c = Client(h.port)
        c.send(f"GET /idle-{i} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        (r,) = c.read(1)
        assert r.status == 200
        idle.append(c)
        time.sleep(0.01)  # a definite age order
    newcomer = Client(h.port)
    newcomer.send(b"GET /newcomer HTTP/1.1\r\nHost: gw\r\n\r\n")
    (r,) = newcomer.read(1)
    assert r.status == 200
    assert idle[0].wait_closed(2), "the oldest idle connection should have been closed"
    assert idle[0].buf == b""  # closed silently
    # the youngest idle ones are still usable
    idle[-1].send(b"GET /still-here HTTP/1.1\r\nHost: gw\r\n\r\n")
    (r,) = idle[-1].read(1)
    assert r.status == 200
    for c in idle + [newcomer]:
        c.close()


def test_busy_connections_are_kept_and_newcomers_refused(h):
    busy = []
    for i in range(CAP):
        c = Client(h.port)
        c.send(f"GET /busy-{i} HTTP/1.1\r\nHost: gw\r\n".encode())  # a head still arriving
        busy.append(c)
    time.sleep(0.2)
    refused = Client(h.port)
    try:
        refused.send(b"GET /refused HTTP/1.1\r\nHost: gw\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    replies = refused.read(1)
    assert replies and (replies[0].status, replies[0].code) == (503, "overloaded")
    assert replies[0].header("retry-after") == "1"
    assert refused.wait_closed()
    refused.close()
    # the busy ones were not touched: each can finish its request
    for c in busy[:3]:
        c.send(b"\r\n")
        (r,) = c.read(1)
        assert r.status == 200
    for c in busy:
        c.close()
    deadline = time.monotonic() + 5
    while "connection cap" not in h.gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "connection cap" in h.gw.log()
    assert h.metric("fastgate_connections_refused_total", 1) == 1
