"""Hardening, family 7: client-address fields from an untrusted peer are
removed; the gateway sets its own X-Forwarded-* (and an RFC 7239 Forwarded
when configured). From a trusted proxy they pass (issue 9, must-have 7)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker

SPOOFED = {
    "X-Real-IP": "6.6.6.6",
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Client-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
    "X-Cluster-Client-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Forwarded-Port": "6666",
    "X-Forwarded-Prefix": "/evil",
}


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("addr"))
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def h_trusted(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("addr-trusted"), server="forwarded_header = true", extra="""
        [ip]
        trusted_proxies = ["127.0.0.0/8"]
        """)
    yield harness
    harness.stop()


def fields(h, mark):
    out = {}
    for n, v in h.up.message_with(mark).headers:
        out.setdefault(n.decode().lower(), []).append(v.decode())
    return out


@pytest.mark.parametrize("name", SPOOFED)
def test_spoofed_client_address_fields_are_removed(h, name):
    mark = marker()
    assert h.get(f"/{mark}", f"{name}: {SPOOFED[name]}\r\n").status == 200
    seen = fields(h, mark)
    assert name.lower() not in seen
    assert not any("6.6.6.6" in v or "6666" in v or "/evil" in v for vs in seen.values() for v in vs)


def test_gateway_sets_its_own_forwarding_fields(h):
    mark = marker()
    extra = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    assert h.get(f"/{mark}", extra).status == 200
    seen = fields(h, mark)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["gw"]
    assert "forwarded" not in seen  # not configured on this gateway


def test_all_spoofed_fields_at_once_on_a_key_route(h):
    mark = marker()
    extra = "".join(f"{n}: {v}\r\n" for n, v in SPOOFED.items())
    assert h.get(f"/api/public/{mark}", extra, key=True).status == 200
    seen = fields(h, mark)
    assert not {n.lower() for n in SPOOFED} & set(seen)


def test_trusted_proxy_fields_pass_and_forwarded_is_appended(h_trusted):
    mark = marker()
    extra = ("X-Real-IP: 203.0.113.9\r\nForwarded: for=203.0.113.9;proto=https\r\nX-Forwarded-For: 203.0.113.9\r\n"
             "X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n")
    assert h_trusted.get(f"/{mark}", extra).status == 200
    seen = fields(h_trusted, mark)
    assert seen["x-real-ip"] == ["203.0.113.9"]
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["shop.example"]
    # the proxy's element first, then ours (RFC 7239 §4: a list across fields)
    assert seen["forwarded"] == ["for=203.0.113.9;proto=https", "for=127.0.0.1;proto=https;host=gw"]
