"""Hardening, family 4: no scope escape through override fields. Method
override and URL override fields are removed before proxying; a route may opt
in to method override, and then the overridden method is the one checked
against the route and the key's scopes (issue 9, must-have 4)."""

from __future__ import annotations

import pytest

from hardening_kit import Harness, marker

OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("override"), extra="""
        [[routes]]
        name = "legacy"
        path = "/legacy"
        upstream = "rec"
        auth = "key"
        method_override = true
        """, scopes=("GET /api/public/*", "GET /legacy/*"))
    yield harness
    harness.stop()


def fields_seen(h, mark):
    return {n.decode().lower(): v.decode() for n, v in h.up.message_with(mark).headers}


@pytest.mark.parametrize("name", OVERRIDES)
def test_method_override_fields_are_removed(h, name):
    mark = marker()
    assert h.get(f"/api/public/{mark}", f"{name}: DELETE\r\n", key=True).status == 200
    seen = fields_seen(h, mark)
    assert not {n.lower() for n in OVERRIDES} & set(seen)


@pytest.mark.parametrize("name", ["X-Original-URL", "X-Rewrite-URL"])
def test_url_override_fields_are_removed(h, name):
    mark = marker()
    assert h.get(f"/api/public/{mark}", f"{name}: /api/admin\r\n", key=True).status == 200
    assert name.lower() not in fields_seen(h, mark)


def test_all_of_them_at_once_on_an_open_route(h):
    mark = marker()
    extra = "".join(f"{n}: DELETE\r\n" for n in OVERRIDES) + "X-Original-URL: /x\r\nX-Rewrite-URL: /y\r\n"
    assert h.get(f"/{mark}", extra).status == 200
    seen = fields_seen(h, mark)
    assert not {n.lower() for n in OVERRIDES + ["X-Original-URL", "X-Rewrite-URL"]} & set(seen)


@pytest.mark.parametrize("name", OVERRIDES)
def test_opted_in_route_checks_the_overridden_method_against_scopes(h, name):
    # The key may only GET /legacy/*: a GET carrying an override to DELETE is a DELETE.
    mark = marker()
    raw = f"GET /legacy/{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\n{name}: DELETE\r\n\r\n".encode()
    h.assert_refused(raw, 403, "scope_denied", mark, fate="open")


def test_opted_in_route_forwards_an_allowed_override(h):
    mark = marker()
    raw = (f"POST /legacy/{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\nX-HTTP-Method-Override: GET\r\n"
           "Content-Length: 0\r\n\r\n").encode()
    (r,), c = h.request(raw)
    c.close()
    assert r.status == 200
    m = h.up.message_with(mark)
    assert m.method == b"POST" and m.header("x-http-method-override") == "GET"


def test_opted_in_route_refuses_a_nonsense_override(h):
    mark = marker()
    raw = f"GET /legacy/{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\nX-HTTP-Method: GET /x\r\n\r\n".encode()
    h.assert_refused(raw, 400, "bad_request", mark, fate="open")


def test_without_opt_in_the_request_method_is_what_scopes_see(h):
    # DELETE with an override to GET is still a DELETE on a normal route.
    mark = marker()
    raw = (f"DELETE /api/public/{mark} HTTP/1.1\r\nHost: gw\r\nx-api-key: {h.key}\r\n"
           "X-HTTP-Method-Override: GET\r\n\r\n").encode()
    h.assert_refused(raw, 403, "scope_denied", mark, fate="open")
