"""Hardening, family 5: path forms that back ends resolve differently from us
are refused with 400, so a key scoped to GET /api/public/* can never reach
another path (issue 9, must-have 5)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("paths"))
    yield harness
    harness.stop()


REFUSED = [
    # path parameters on dot segments (Tomcat, Spring: '/a/..;/b' is '/b')
    "/api/public/..;/admin", "/api/public/..;x=y/admin", "/api/public/%2e%2e;/admin", "/api/public/.%2e;/admin",
    "/api/public/.;/admin", "/api/public/..%3b/admin", "/api/public/..%3B/admin",
    # overlong and invalid UTF-8
    "/api/public/%C0%AE%C0%AE/admin", "/api/public/%E0%80%AE%E0%80%AE/admin", "/api/public/..%C0%AFadmin",
    "/api/public/%C0%2E%C0%2E/admin", "/api/public/%FF/admin", "/api/public/%ED%A0%80",
    # dot segments with encoded controls or spaces
    "/api/public/..%09/admin", "/api/public/..%20/admin", "/api/public/%20../admin", "/api/public/..%0d/admin",
    "/api/public/..%00/admin", "/api/public/.%00./admin",
    # encoded control characters anywhere
    "/api/public/a%0d%0aX-Injected:%201", "/api/public/a%00b", "/api/public/a%7f",
    # not a path at all
    "/api/public/%zz", "/api/public/%2",
]


@pytest.mark.parametrize("path", REFUSED)
def test_path_forms_are_refused(h, path):
    mark = marker()
    raw = f"GET {path}?{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\n\r\n".encode()
    h.assert_refused(raw, 400, "bad_request", mark)


DOUBLE = ["/api/public/%252e%252e/admin", "/api/public/%252E%252E/admin", "/api/public/..%252fadmin",
          "/api/public/..%252Fadmin", "/api/public/..%255cadmin", "/api/public/%252e%252e%252fadmin"]


@pytest.mark.parametrize("path", DOUBLE)
def test_double_encoding_is_refused_on_key_routes(h, path):
    # A well-framed request refused at the route: the connection stays usable.
    mark = marker()
    raw = f"GET {path}?{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\n\r\n".encode()
    h.assert_refused(raw, 400, "bad_request", mark, fate="open")


RESOLVED = [
    "/api/public/../admin", "/api/public/%2e%2e/admin", "/api/public/.%2e/admin", "/api/public/..%2fadmin",
    "/api/public/..%2Fadmin", "/api/public/..%5cadmin", "/api/public/..\\admin", "/api/public//..//admin",
    "/api/public/./../admin", "/api/public/x/../../admin",
]


@pytest.mark.parametrize("path", RESOLVED)
def test_resolved_escapes_are_scope_denied(h, path):
    # We resolve these ourselves, and what we authorise is what we forward.
    mark = marker()
    raw = f"GET {path}?{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\n\r\n".encode()
    h.assert_refused(raw, 403, "scope_denied", mark, fate="open")


@pytest.mark.parametrize("path,forwarded", [
    ("/api/public/a;b", "/api/public/a;b"),
    ("/api/public/.well-known/x", "/api/public/.well-known/x"),
    ("/api/public/x/../y", "/api/public/y"),
    ("/api/public/caf%C3%A9", "/api/public/caf%C3%A9"),
    ("/api/public/a%20b", "/api/public/a%20b"),
    ("/api/public/...", "/api/public/..."),
    ("/api/public/%7euser", "/api/public/~user"),
])
def test_ordinary_paths_are_served_as_normalised(h, path, forwarded):
    mark = marker()
    r = h.get(f"{path}?{mark}", key=True)
    assert r.status == 200, r.body
    assert h.up.message_with(mark).url.decode() == f"{forwarded}?{mark}"


def test_double_encoding_passes_on_open_routes_by_default(h):
    mark = marker()
    r = h.get(f"/files/%252e%252e?{mark}")
    assert r.status == 200
    assert h.up.message_with(mark).url.decode() == f"/files/%252e%252e?{mark}"


def test_double_encoding_can_be_refused_on_open_routes(tmp_path):
    harness = Harness(tmp_path, extra="""
        [[routes]]
        name = "strict"
        path = "/strict"
        upstream = "rec"
        auth = "none"
        reject_double_encoding = true
        """)
    try:
        mark = marker()
        harness.assert_refused(f"GET /strict/%252f?{mark} HTTP/1.1\r\nHost: gw\r\n\r\n".encode(), 400, "bad_request",
                               mark, fate="open")
    finally:
        harness.stop()
