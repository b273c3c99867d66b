"""Hardening, family 2: Host is an authority and nothing else (RFC 9112 §3.2,
RFC 3986 §3.2.2): a reg-name, an IPv4 address or [IPv6], with an optional
port 1-65535 (issue 9, must-have 2)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("host"), extra="""
        [[routes]]
        name = "vhost"
        host = "api.example"
        path = "/"
        upstream = "rec"
        auth = "none"
        preserve_host = true
        """)
    yield harness
    harness.stop()


BAD = {
    "comma list": "a.example, b.example",
    "comma": "a.example,b.example",
    "space": "a.example b.example",
    "slash": "a.example/x",
    "userinfo": "user@a.example",
    "userinfo with password": "u:p@a.example",
    "port 0": "a.example:0",
    "port 65536": "a.example:65536",
    "port letters": "a.example:8o",
    "empty port": "a.example:",
    "two ports": "a.example:80:81",
    "semicolon": "a.example;b",
    "percent-encoded": "a%2eexample",
    "backslash": "a\\b",
    "question mark": "a.example?x",
    "hash": "a.example#x",
    "quote": '"a.example"',
    "bracketed reg-name": "[a.example]",
    "bad IPv6": "[::g]",
    "IPv6 zone": "[fe80::1%25eth0]",
    "unbracketed IPv6": "::1",
    "unclosed bracket": "[::1",
    "empty": "",
    "plus": "a+b.example",
    "exclamation": "a!.example",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_host_is_refused(h, case):
    mark = marker()
    raw = f"GET /{mark} HTTP/1.1\r\nHost: {BAD[case]}\r\n\r\n".encode()
    h.assert_refused(raw, 400, "bad_request", mark)


def test_two_hosts_are_refused(h):
    mark = marker()
    h.assert_refused(f"GET /{mark} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".encode(), 400, "bad_request", mark)


def test_missing_host_in_http11_is_refused(h):
    mark = marker()
    h.assert_refused(f"GET /{mark} HTTP/1.1\r\n\r\n".encode(), 400, "bad_request", mark)


@pytest.mark.parametrize("target", ["http://u@api.example/{m}", "http://api.example,evil/{m}", "http://api.example:0/{m}",
                                    "http://[::1/{m}", "ftp://api.example/{m}", "//api.example/{m}x"])
def test_bad_absolute_form_authority_is_refused(h, target):
    mark = marker()
    raw = f"GET {target.format(m=mark)} HTTP/1.1\r\nHost: api.example\r\n\r\n".encode()
    if target.startswith("//"):
        # a path, not an authority: served on the open route, normalised
        (r,), c = h.request(raw)
        c.close()
        assert r.status == 200 and r.json()["path"] == f"/api.example/{mark}x"
        return
    h.assert_refused(raw, 400, "bad_request", mark)


@pytest.mark.parametrize("host", ["api.example", "API.Example:8080", "127.0.0.1", "127.0.0.1:65535", "[::1]",
                                  "[2001:db8::1]:443", "a_b.example", "xn--bcher-kva.example", "localhost."])
def test_valid_hosts_are_served(h, host):
    mark = marker()
    (r,), c = h.request(f"GET /{mark} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    c.close()
    assert r.status == 200, r.body
    assert h.up.saw(mark)


def test_host_routes_on_the_authority_without_its_port(h):
    mark = marker()
    (r,), c = h.request(f"GET /{mark} HTTP/1.1\r\nHost: API.example:8080\r\n\r\n".encode())
    c.close()
    assert r.status == 200
    # preserve_host: the vhost route forwards the validated authority as sent
    assert h.up.message_with(mark).header("host") == "API.example:8080"


def test_absolute_form_authority_replaces_host(h):
    mark = marker()
    (r,), c = h.request(f"GET http://api.example/{mark} HTTP/1.1\r\nHost: other.example\r\n\r\n".encode())
    c.close()
    assert r.status == 200
    assert h.up.message_with(mark).header("host") == "api.example"
