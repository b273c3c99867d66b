"""Hardening, family 6: only WebSocket upgrades tunnel (issue 9, must-have 6).
Any other Upgrade token is removed and never tunnels; a 101 answering an
upgrade the gateway did not forward is a 502; Connection: close with Upgrade
never tunnels; bytes after an upgrade head are held until the 101."""

from __future__ import annotations

import pytest

from hardening_kit import Client, Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("upgrade"))
    yield harness
    harness.stop()


@pytest.mark.parametrize("token", ["h2c", "HTTP/2.0", "TLS/1.2", "websocket, h2c", "foo"])
def test_other_upgrades_are_plain_requests(h, token):
    mark = marker()
    raw = (f"GET /{mark} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {token}\r\n"
           "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n").encode()
    (r,), c = h.request(raw)
    assert r.status == 200
    # still an ordinary keep-alive connection
    c.send(b"GET /again HTTP/1.1\r\nHost: gw\r\n\r\n")
    (r2,) = c.read(1)
    c.close()
    assert r2.status == 200
    names = [n.decode().lower() for n, _ in h.up.message_with(mark).headers]
    assert "upgrade" not in names and "http2-settings" not in names and "connection" not in names


def test_unsolicited_101_is_a_502_never_a_tunnel(h):
    mark = marker()
    c = Client(h.port)
    c.send(f"GET /{mark}/upgrade-anyway HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".encode())
    (r,) = c.read(1)
    assert (r.status, r.code) == (502, "upstream_unavailable")
    # nothing the client sends now may reach the upstream as tunnel bytes
    tunnel = marker()
    try:
        c.send(f"PRI * HTTP/2.0 {tunnel}\r\n\r\n".encode())
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.wait_closed(2)
    c.close()
    assert not h.up.saw(tunnel)


@pytest.mark.parametrize("conn", ["Upgrade, close", "close, Upgrade"])
def test_upgrade_with_connection_close_is_refused(h, conn):
    mark = marker()
    raw = f"GET /ws/{mark} HTTP/1.1\r\nHost: gw\r\nConnection: {conn}\r\nUpgrade: websocket\r\n\r\n".encode()
    h.assert_refused(raw, 400, "upgrade_refused", mark)


@pytest.mark.parametrize("raw", [
    "POST /ws/{m} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
    "GET /ws/{m} HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "GET /ws/{m} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\nabcd",
], ids=["POST", "HTTP/1.0", "with a body"])
def test_malformed_websocket_upgrades_are_refused(h, raw):
    mark = marker()
    h.assert_refused(raw.format(m=mark).encode(), 400, "upgrade_refused", mark)


def test_websocket_tunnels_and_early_bytes_wait_for_the_101(h):
    mark = marker()
    early = f"early-{mark}".encode()
    c = Client(h.port)
    # the head and the first frame bytes in one write
    c.send(f"GET /ws/{mark} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode() + early)
    (r,) = c.read(1)
    assert r.status == 101
    # the echo upstream returns the held bytes once it has sent its 101
    got = c.buf
    while early not in got and not c.closed:
        c._recv(__import__("time").monotonic() + 2)
        got = c.buf
    assert early in got
    up = h.up.conn_with(mark)
    assert up.upgraded and up.before_101 == 0, "bytes after the upgrade head reached the upstream before its 101"
    c.send(b"more-bytes")
    c._recv(__import__("time").monotonic() + 2)
    c.close()


def test_websocket_upgrade_on_a_key_route_needs_the_key(h):
    mark = marker()
    raw = f"GET /api/public/ws/{mark} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nxx"
    h.assert_refused(raw.encode(), 401, "key_missing", mark)
