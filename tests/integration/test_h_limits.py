"""Hardening, family 8: limits fit real traffic. The head is bounded by bytes,
as nginx bounds it, and the field count is a generous second bound; real
requests with many fields pass, floods are refused (issue 9, must-have 8)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("limits"))
    yield harness
    harness.stop()


def many(n: int, start: int = 0) -> str:
    return "".join(f"X-Field-{i}: value-{i}\r\n" for i in range(start, start + n))


def test_a_hundred_ordinary_fields_plus_host_and_key(h):
    mark = marker()
    r = h.get(f"/api/public/{mark}", many(100), key=True)
    assert r.status == 200
    assert len([n for n, _ in h.up.message_with(mark).headers if n.startswith(b"X-Field-")]) == 100


def test_key_after_two_hundred_fields(h):
    mark = marker()
    raw = f"GET /api/public/{mark} HTTP/1.1\r\nHost: gw\r\n{many(200)}x-api-key: {h.key}\r\n\r\n".encode()
    (r,), c = h.request(raw)
    c.close()
    assert r.status == 200, r.body


def test_a_big_cookie(h):
    mark = marker()
    assert h.get(f"/{mark}", "Cookie: " + "a=" + "b" * 12000 + "\r\n").status == 200


def test_too_many_fields(h):
    mark = marker()
    raw = f"GET /{mark} HTTP/1.1\r\nHost: gw\r\n".encode() + b"X: a\r\n" * 600 + b"\r\n"
    h.assert_refused(raw, 431, "headers_too_large", mark)


def test_too_many_header_bytes(h):
    mark = marker()
    raw = f"GET /{mark} HTTP/1.1\r\nHost: gw\r\nX-Big: {'a' * 40000}\r\n\r\n".encode()
    h.assert_refused(raw, 431, "headers_too_large", mark)


def test_ten_thousand_fields(h):
    mark = marker()
    raw = f"GET /{mark} HTTP/1.1\r\nHost: gw\r\n".encode() + b"X-Flood: v\r\n" * 10_000 + b"\r\n"
    h.assert_refused(raw, 431, "headers_too_large", mark)


def test_url_too_long(h):
    mark = marker()
    raw = f"GET /{mark}?{'q' * 9000} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
    h.assert_refused(raw, 414, "uri_too_long", mark)


def test_an_endless_request_line_is_refused_before_it_ends(h):
    mark = marker()
    raw = f"GET /{mark}".encode() + b"a" * 20000
    h.assert_refused(raw, 414, "uri_too_long", mark)
