"""Hardening, family 3: fields whose name has an underscore are dropped before
proxying (nginx's underscores_in_headers off); with the option on, no
underscore alias of a field the gateway manages (framing, the key header,
identity, forwarding) ever passes (issue 9, must-have 3)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("underscore"))
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def h_on(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("underscore-on"), server="underscores_in_headers = true")
    yield harness
    harness.stop()


def names_seen(h, mark):
    return [n.decode().lower() for n, _ in h.up.message_with(mark).headers]


def test_underscore_fields_are_dropped_by_default(h):
    mark = marker()
    assert h.get(f"/{mark}", "X_Custom: 1\r\nX-Custom: 2\r\n").status == 200
    names = names_seen(h, mark)
    assert "x-custom" in names and "x_custom" not in names


def test_opt_in_forwards_ordinary_underscore_fields(h_on):
    mark = marker()
    assert h_on.get(f"/{mark}", "X_Custom: 1\r\n").status == 200
    assert "x_custom" in names_seen(h_on, mark)


@pytest.mark.parametrize("harness", ["h", "h_on"])
def test_underscore_key_header_never_authenticates(harness, request):
    hh = request.getfixturevalue(harness)
    mark = marker()
    raw = f"GET /api/public/{mark} HTTP/1.1\r\nHost: gw\r\nX_Api_Key: {hh.key}\r\n\r\n".encode()
    hh.assert_refused(raw, 401, "key_missing", mark, fate="open")


@pytest.mark.parametrize("harness", ["h", "h_on"])
def test_underscore_key_header_beside_a_real_key_is_dropped(harness, request):
    hh = request.getfixturevalue(harness)
    mark = marker()
    assert hh.get(f"/api/public/{mark}", f"X_Api_Key: {hh.key}\r\n", key=True).status == 200
    names = names_seen(hh, mark)
    assert "x_api_key" not in names and "x-api-key" not in names


@pytest.mark.parametrize("harness", ["h", "h_on"])
def test_underscore_framing_fields_never_frame_the_body(harness, request):
    hh = request.getfixturevalue(harness)
    # Transfer_Encoding does not make this chunked: the body is framed by its
    # Content-Length, and the alias never reaches the upstream.
    mark, nxt = marker(), marker()
    raw = (f"POST /{mark} HTTP/1.1\r\nHost: gw\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello"
           f"GET /{nxt} HTTP/1.1\r\nHost: gw\r\n\r\n").encode()
    replies, c = hh.request(raw, 2)
    c.close()
    assert [r.status for r in replies] == [200, 200]
    assert replies[0].json()["body_bytes"] == 5
    m = hh.up.message_with(mark)
    assert m.body == b"hello"
    assert "transfer_encoding" not in [n.decode().lower() for n, _ in m.headers]
    # Content_Length does not give a GET a body: the next request is read as one
    mark, nxt = marker(), marker()
    raw = f"GET /{mark} HTTP/1.1\r\nHost: gw\r\nContent_Length: 5\r\n\r\nGET /{nxt} HTTP/1.1\r\nHost: gw\r\n\r\n"
    replies, c = hh.request(raw.encode(), 2)
    c.close()
    assert [r.status for r in replies] == [200, 200]
    assert "content_length" not in names_seen(hh, mark)
    assert hh.up.message_with(nxt).body == b""


@pytest.mark.parametrize("name", ["X_Forwarded_For", "X_Real_IP", "X_Fastgate_Key_Id", "X_HTTP_Method_Override",
                                  "X_Original_URL", "Content_Length", "Transfer_Encoding", "X_Request_ID"])
def test_aliases_of_managed_fields_never_pass_even_when_opted_in(h_on, name):
    mark = marker()
    assert h_on.get(f"/{mark}", f"{name}: forged\r\n").status == 200
    m = h_on.up.message_with(mark)
    assert name.lower() not in [n.decode().lower() for n, _ in m.headers]
    assert all(v != b"forged" for _, v in m.headers)
