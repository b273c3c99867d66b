"""Hardening, families 10 and 12: every exchange leaves a trace, and its
latencies are real (issue 9, must-haves 10 and 12). An upstream that cuts or
resets a response mid-body leaves a log line with the status sent, the bytes
actually sent and error = upstream_cut; a client that leaves early leaves one
with client_closed; total_us and upstream_us come from a µs monotonic clock."""

from __future__ import annotations

import time

import pytest

from hardening_kit import Client, Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("trace"), extra="""
        [log]
        access = "access.log"
        """)
    yield harness
    harness.stop()


@pytest.mark.parametrize("how", ["cut", "cut-rst"])
def test_an_upstream_cut_leaves_a_log_line(h, how):
    mark = marker()
    c = Client(h.port)
    c.send(f"GET /{mark}/{how} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    assert c.wait_closed()
    head, _, body = c.buf.partition(b"\r\n\r\n")
    c.close()
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 1000  # cut, never completed
    (rec,) = h.log_lines(mark)
    assert rec["status"] == 200 and rec["bytes_out"] == 1000 and rec["error"] == "upstream_cut"
    assert rec["decision"] == "upstream" and rec["upstream"] == h.up.addr
    h.cuts = getattr(h, "cuts", 0) + 1
    assert h.metric("fastgate_upstream_cut_total", h.cuts) >= h.cuts


def test_a_client_that_leaves_leaves_a_log_line(h):
    mark = marker()
    c = Client(h.port)
    c.send(f"GET /{mark}/slow HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    time.sleep(0.2)
    c.close()
    (rec,) = h.log_lines(mark, timeout=5)
    assert rec["error"] == "client_closed" and rec["status"] == 499


def test_latencies_are_microseconds_from_a_monotonic_clock(h):
    marks = [marker() for _ in range(20)]
    for m in marks:
        assert h.get(f"/{m}").status == 200
    recs = [h.log_lines(m)[0] for m in marks]
    totals = [r["total_us"] for r in recs]
    ups = [r["upstream_us"] for r in recs]
    assert all(t > 0 for t in totals), totals
    assert all(0 < u <= t for u, t in zip(ups, totals)), (ups, totals)
    # a 1 ms clock gives multiples of ~1000 (or 0): a µs clock does not
    assert not all(t % 1000 == 0 for t in totals), totals
