"""Hardening, across families: mutated and random requests never get a 500,
never leave a traceback in the gateway's log, and never leave it unable to
serve the next client."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening_kit import Client, Harness


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("fuzz"), server="header_timeout = 1.0\nbody_timeout = 1.0")
    yield harness
    harness.stop()


SEEDS = [
    b"GET /api/public/x?q=1 HTTP/1.1\r\nHost: gw\r\nx-api-key: KEY\r\nAccept: */*\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET http://gw/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /y HTTP/1.1\r\nHost: gw\r\n\r\n",
]
NASTY = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b"_", b":", b",", b";", b"%", b"%2e", b"..", b"/",
         b"\xff", b"0x", b"-", b"+", b"\"", b"@", b"[", b"]", b"Transfer-Encoding: chunked\r\n",
         b"Content-Length: 3\r\n", b"Host: b\r\n", b"\r\n\r\n"]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(NASTY))
        if op == "insert":
            data[i:i] = piece
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 4))]
        else:
            data[i:i + len(piece)] = piece
    return bytes(data)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated(), st.binary(min_size=1, max_size=200)))
def test_no_input_gets_a_500(h, raw):
    raw = raw.replace(b"KEY", h.key.encode())
    c = Client(h.port)
    try:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = c.read(1, timeout=0.3)
    finally:
        c.close()
    for r in replies:
        assert r.status < 500 or r.status in (502, 505), (r.status, r.body, raw)


def test_and_the_gateway_is_still_well(h):
    assert h.get("/after-fuzz").status == 200
    assert h.get("/api/public/after-fuzz", key=True).status == 200
    log = h.gw.log()
    assert "Traceback" not in log and "bug while" not in log, log[-3000:]
