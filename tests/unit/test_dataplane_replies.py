"""Every local reply the data plane can send, provoked through the fake
transports (tests/unit/dataplane_kit.py): status and JSON error code from the
one error table (fastgate.errors.ERRORS), the stage the request counter names,
the extra fields each carries (WWW-Authenticate, Retry-After, RateLimit-*,
Allow), and what happens to the connection.

Each test says which codes it provokes (@provokes); the last test checks that
every code of the error table is provoked here or is listed in NOT_SENT with
the reason the data plane never sends it, so a new error code without a test
fails."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest
from dataplane_kit import BASE, Gateway

from fastgate import core
from fastgate.admin import keysync
from fastgate.errors import ERRORS, STAGE_OF

PROVOKED: dict[str, list[str]] = {}

# Codes of the error table the proxy's data plane never sends, and why.
NOT_SENT = {
    "key_suspended": "no producer yet: a disabled key answers key_invalid (fastgate.core.ERROR_CODE)",
    "credits_exhausted": "no credits stage yet (issue 11 names it as a future stage)",
    "store_unavailable": "the admin API's answer when the key store cannot be used",
    "unauthorized": "admin API only",
    "not_found": "admin API only",
    "conflict": "admin API only",
    "key_table_full": "admin API only",
}


def provokes(*codes):
    def mark(fn):
        for code in codes:
            PROVOKED.setdefault(code, []).append(fn.__name__)
        return fn

    return mark


def check(gw, r, code, *, closes=None, head=False):
    """The reply is the error table's: status, JSON code, request id in the
    body and in x-request-id, a valid length; the worker counted it under the
    table's stage."""
    status, stage = ERRORS[code]
    assert (r.status, r.code if not head else code) == (status, code), r.raw
    assert r.header("content-type") == "application/json"
    if not head:
        err = r.json()["error"]
        assert err["request_id"] == r.header("x-request-id") and isinstance(err["message"], str) and err["message"]
        assert int(r.header("content-length")) == len(r.body)
    if closes is not None:
        assert r.closes == closes, r.raw
    counted = gw.decisions()
    assert any(dec == stage and cls == status // 100 for (_, cls, dec) in counted), (stage, counted)


@pytest.fixture
def gw():
    g = Gateway()
    yield g
    g.close()


def get(path="/", *fields, method="GET", version="1.1", body=b""):
    head = f"{method} {path} HTTP/{version}\r\n" + ("Host: gw\r\n" if version == "1.1" else "")
    head += "".join(f + "\r\n" for f in fields)
    return head.encode() + b"\r\n" + body


# -- parse --------------------------------------------------------------------------------------


@provokes("bad_request")
def test_bad_request_for_framing_closes(gw):
    c = gw.client().send(get("/", "Content-Length: 3", "Content-Length: 4", method="POST", body=b"abcd"))
    check(gw, c.response(), "bad_request", closes=True)
    assert c.closed and c.transport.ended == "eof", "a lingering close: half-close first, then drain"
    # the lingering close ends when the client goes quiet
    c.send(b"more bytes the gateway discards")
    gw.advance(1.0)
    assert c.transport.ended == "fin" and gw.upstream.received == b""


@provokes("upgrade_refused")
def test_upgrade_refused(gw):
    c = gw.client().send(get("/ws", "Connection: upgrade, close", "Upgrade: websocket"))
    check(gw, c.response(), "upgrade_refused", closes=True)
    assert gw.upstream.received == b""


@provokes("uri_too_long")
def test_uri_too_long():
    g = Gateway(BASE.replace("[server]", '[server]\nmax_url_bytes = "1k"'))
    try:
        c = g.client().send(b"GET /" + b"a" * 2000)  # refused without waiting for the line to end
        check(g, c.response(), "uri_too_long", closes=True)
        assert g.upstream.received == b""
    finally:
        g.close()


@provokes("headers_too_large")
def test_headers_too_large():
    g = Gateway(BASE.replace("[server]", "[server]\nmax_headers = 10"))
    try:
        c = g.client().send(get("/", *[f"X-F{i}: v" for i in range(10)]))
        check(g, c.response(), "headers_too_large", closes=True)
        ok = g.request(get("/", *[f"X-F{i}: v" for i in range(9)]))
        assert ok.status == 200
    finally:
        g.close()


@provokes("http_version_not_supported")
def test_http_version_not_supported(gw):
    check(gw, gw.request(b"GET / HTTP/2.0\r\nHost: gw\r\n\r\n"), "http_version_not_supported", closes=True)


@provokes("request_timeout")
def test_request_timeout_for_a_slow_head(gw):
    c = gw.client().send(b"GET / HTTP/1.1\r\nHost: g")
    gw.advance(9.0)
    assert c.out == b""
    gw.advance(2.0)  # past header_timeout (10 s)
    check(gw, c.response(), "request_timeout", closes=True)
    assert gw.upstream.received == b""


@provokes("request_timeout")
def test_request_timeout_for_a_slow_body(gw):
    c = gw.client().send(get("/", "Content-Length: 1000", method="POST", body=b"x" * 10))
    gw.advance(31.0)  # one body_timeout window (30 s) at far below min_body_rate (1k/s)
    check(gw, c.response(), "request_timeout", closes=True)
    assert gw.upstream.received == b"", "a body within request_buffer never left"
    # past request_buffer it was streaming: the upstream leg is reset, never left looking complete
    c = gw.client().send(get("/big", "Content-Length: 100000", method="POST", body=b"x" * 10))
    (link,) = gw.upstream.links
    assert link.received.startswith(b"POST /big ")
    gw.advance(31.0)
    assert c.response().code == "request_timeout"
    assert link.transport.ended == "rst" and link.requests == []


def test_an_unused_or_idle_connection_is_closed_silently(gw):
    fresh = gw.client()
    gw.advance(11.0)  # header_timeout: nothing was sent, nothing is answered
    assert fresh.closed and fresh.out == b""
    idle = gw.client().send(get("/"))
    assert idle.response().status == 200
    gw.advance(61.0)  # keepalive_timeout
    assert idle.closed and len(idle.responses()) == 1, "no 408 a reusing client could take for its answer"


# -- route --------------------------------------------------------------------------------------

HOSTED = """
[[upstreams]]
name = "u"
targets = ["10.9.9.9:8080"]

[[routes]]
name = "api"
host = "api.example"
path = "/v1"
upstream = "u"
auth = "none"
methods = ["GET", "POST"]
"""


@provokes("no_route")
def test_no_route():
    g = Gateway(HOSTED)
    try:
        c = g.client().send(b"GET /v1/x HTTP/1.1\r\nHost: other.example\r\n\r\n"
                            b"GET /v2 HTTP/1.1\r\nHost: api.example\r\n\r\n"
                            b"GET /v1/x HTTP/1.1\r\nHost: API.example:8080\r\n\r\n")
        a, b, ok = c.responses()
        check(g, a, "no_route", closes=False)
        check(g, b, "no_route", closes=False)
        assert ok.status == 200 and not c.closed
    finally:
        g.close()


@provokes("method_not_allowed")
def test_method_not_allowed_says_what_is():
    g = Gateway(HOSTED)
    try:
        r = g.request(b"DELETE /v1/x HTTP/1.1\r\nHost: api.example\r\n\r\n")
        check(g, r, "method_not_allowed", closes=False)
        assert r.header("allow") == "GET, POST"
        assert g.upstream.received == b""
    finally:
        g.close()


@provokes("bad_request")
def test_bad_request_for_paths(gw):
    # an invalid path (encoded control character): refused as input, then close
    c = gw.client().send(get("/%00"))
    check(gw, c.response(), "bad_request", closes=True)
    # a double-encoded dot on a key route: the route refuses it, the connection stays
    c = gw.client().send(get("/k/%252e%252e/x"))
    check(gw, c.response(), "bad_request", closes=False)
    assert gw.upstream.received == b""


OVERRIDE = BASE + """
[[routes]]
name = "legacy"
path = "/legacy"
upstream = "u"
auth = "none"
method_override = true
methods = ["GET", "PATCH"]
"""


@provokes("bad_request")
def test_bad_request_for_an_unknown_override_method():
    g = Gateway(OVERRIDE)
    try:
        r = g.request(get("/legacy/x", "X-HTTP-Method-Override: BREW", method="POST", body=b""))
        check(g, r, "bad_request", closes=False)
        # a known one is what the route checks, and the field goes upstream
        r = g.request(get("/legacy/x", "X-HTTP-Method-Override: PATCH", method="POST"))
        assert r.status == 200 and r.json()["method"] == "POST"
        assert g.upstream.requests[-1].header("x-http-method-override") == "PATCH"
        r = g.request(get("/legacy/x", "X-HTTP-Method-Override: DELETE", method="POST"))
        check(g, r, "method_not_allowed")
    finally:
        g.close()


# -- ip -------------------------------------------------------------------------------------------

IPS = BASE + """
[ip]
deny = ["203.0.113.0/24", "2001:db8:bad::/48"]
trusted_proxies = ["10.0.0.0/8"]
"""


@provokes("ip_denied")
def test_ip_denied_by_the_global_rules():
    g = Gateway(IPS)
    try:
        for peer in ("203.0.113.7", "2001:db8:bad::1"):
            check(g, g.request(get("/"), peer=peer), "ip_denied", closes=False)
        # the client address behind a trusted proxy is what counts
        check(g, g.request(get("/", "X-Forwarded-For: 203.0.113.8"), peer="10.1.1.1"), "ip_denied")
        # ... and an untrusted peer cannot claim one
        assert g.request(get("/", "X-Forwarded-For: 198.51.100.1"), peer="203.0.113.9").status == 403
        assert g.request(get("/", "X-Forwarded-For: 203.0.113.8"), peer="198.51.100.2").status == 200
        assert len(g.upstream.requests) == 1
    finally:
        g.close()


@provokes("ip_denied")
def test_ip_denied_by_an_allow_list():
    g = Gateway(BASE + '\n[ip]\nallow = ["192.0.2.0/24"]\n')
    try:
        check(g, g.request(get("/"), peer="198.51.100.3"), "ip_denied")
        assert g.request(get("/"), peer="192.0.2.3").status == 200
    finally:
        g.close()


# -- limits ---------------------------------------------------------------------------------------


@provokes("body_too_large")
def test_body_too_large_by_its_length(gw):
    key = gw.add_key("b1")
    c = gw.client().send(get("/k/up", f"X-Api-Key: {key}", "Content-Length: 101", "Expect: 100-continue",
                             method="POST"))
    r = c.response()
    check(gw, r, "body_too_large", closes=True)
    assert b"100 Continue" not in c.out, "a refused body is never asked for"
    assert gw.upstream.received == b""


@provokes("body_too_large")
def test_body_too_large_as_a_chunked_body_grows(gw):
    key = gw.add_key("b2")
    c = gw.client().send(get("/k/up", f"X-Api-Key: {key}", "Transfer-Encoding: chunked", method="POST")
                         + b"40\r\n" + b"a" * 64 + b"\r\n")
    assert c.out == b"" and gw.upstream.received == b""
    c.send(b"40\r\n" + b"b" * 64 + b"\r\n")  # 128 > max_body_bytes = 100
    check(gw, c.response(), "body_too_large", closes=True)
    assert gw.upstream.received == b""


# -- key and scope --------------------------------------------------------------------------------

WWW_AUTH = 'Bearer realm="fastgate"'


@provokes("key_missing")
def test_key_missing(gw):
    r = gw.request(get("/k/x"))
    check(gw, r, "key_missing", closes=False)
    assert r.header("www-authenticate") == WWW_AUTH


@provokes("key_invalid")
def test_key_invalid(gw):
    revoked = gw.add_key("gone", revoked=True)
    for key in (core.make_key("nobody"), "fg_nope", revoked, revoked[:-1] + ("A" if revoked[-1] != "A" else "B")):
        r = gw.request(get("/k/x", f"X-Api-Key: {key}"))
        check(gw, r, "key_invalid", closes=False)
        assert r.header("www-authenticate") == WWW_AUTH
    assert gw.upstream.received == b""


@provokes("key_expired")
def test_key_expired(gw):
    key = gw.add_key("old", expires_at="2020-01-01T00:00:00Z")
    r = gw.request(get("/k/x", f"Authorization: Bearer {key}"))
    check(gw, r, "key_expired", closes=False)
    assert r.header("www-authenticate") == WWW_AUTH


@provokes("bad_request")
def test_bad_request_for_two_different_keys(gw):
    a, b = gw.add_key("a1"), gw.add_key("b1")
    check(gw, gw.request(get("/k/x", f"X-Api-Key: {a}", f"Authorization: Bearer {b}")), "bad_request", closes=False)
    # the same key twice is one key; it never goes upstream
    r = gw.request(get("/k/x", f"X-Api-Key: {a}", f"Authorization: Bearer {a}"))
    assert r.status == 200 and a not in gw.upstream.received.decode()
    assert gw.upstream.requests[-1].header("x-fastgate-key-id") == "a1"


@provokes("scope_denied")
def test_scope_denied(gw):
    key = gw.add_key("s1", scopes=["GET /k/orders/*"])
    check(gw, gw.request(get("/k/users", f"X-Api-Key: {key}")), "scope_denied", closes=False)
    check(gw, gw.request(get("/k/orders/1", f"X-Api-Key: {key}", method="POST")), "scope_denied")
    assert gw.request(get("/k/orders/1", f"X-Api-Key: {key}")).status == 200


@provokes("ip_denied")
def test_ip_denied_by_the_keys_own_cidrs(gw):
    key = gw.add_key("c1", allow_cidrs=["192.0.2.0/24"], deny_cidrs=["192.0.2.128/25"])
    for peer in ("198.51.100.1", "192.0.2.200"):
        r = gw.request(get("/k/x", f"X-Api-Key: {key}"), peer=peer)
        check(gw, r, "ip_denied", closes=False)
    assert gw.request(get("/k/x", f"X-Api-Key: {key}"), peer="192.0.2.1").status == 200


# -- rate -----------------------------------------------------------------------------------------

RATES = BASE.replace('limits = ["2/minute"]', 'limits = ["2/month"]') + """
[[routes]]
name = "limited"
path = "/limited"
upstream = "u"
auth = "none"
ip_limits = ["1/month"]
"""

RATE_FIELDS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "x-ratelimit-limit",
               "x-ratelimit-remaining", "x-ratelimit-reset")


def rate_fields(r):
    return {n: r.header(n) for n in RATE_FIELDS + ("ratelimit-policy", "retry-after")}


@provokes("rate_limited")
def test_rate_limited_by_the_keys_plan():
    g = Gateway(RATES)
    try:
        key = g.add_key("p1", plan="gold")
        c = g.client().send(get("/k/x", f"X-Api-Key: {key}") * 3)
        one, two, three = c.responses()
        assert [one.status, two.status] == [200, 200]
        for r, left in ((one, "1"), (two, "0")):
            f = rate_fields(r)
            assert (f["ratelimit-limit"], f["ratelimit-remaining"], f["ratelimit-policy"]) == ("2", left, "2;w=2592000")
            assert f["x-ratelimit-remaining"] == left and f["retry-after"] is None
        check(g, three, "rate_limited", closes=False)
        f = rate_fields(three)
        assert (f["ratelimit-limit"], f["ratelimit-remaining"], f["x-ratelimit-limit"]) == ("2", "0", "2")
        assert int(f["retry-after"]) >= 1 and int(f["ratelimit-reset"]) >= 1
        assert f["ratelimit-policy"] == "2;w=2592000"
        assert len(g.upstream.requests) == 2
    finally:
        g.close()


@provokes("rate_limited")
def test_rate_limited_by_the_keys_own_limits():
    g = Gateway(RATES)
    try:
        key = g.add_key("p2", plan="gold", limits=["1/month"])  # replaces the plan's monthly window
        one, two = g.client().send(get("/k/x", f"X-Api-Key: {key}") * 2).responses()
        assert one.status == 200 and one.header("ratelimit-limit") == "1"
        check(g, two, "rate_limited")
        assert two.header("ratelimit-policy") == "1;w=2592000"
    finally:
        g.close()


@provokes("rate_limited")
def test_rate_limited_by_address_on_an_open_route():
    g = Gateway(RATES)
    try:
        one, two = g.client("198.51.100.20").send(get("/limited/x") * 2).responses()
        assert one.status == 200 and one.header("ratelimit-remaining") == "0"
        check(g, two, "rate_limited", closes=False)
        assert int(two.header("retry-after")) >= 1 and two.header("ratelimit-policy") == "1;w=2592000"
        assert g.request(get("/limited/x"), peer="198.51.100.21").status == 200, "another address has its own"
    finally:
        g.close()


@provokes("rate_limited")
def test_rate_limited_after_too_many_failed_key_checks():
    g = Gateway(BASE.replace('failed_auth_limit = "off"', 'failed_auth_limit = "2/month"'))
    try:
        good = g.add_key("ok1")
        c = g.client("198.51.100.30").send(get("/k/x", f"X-Api-Key: {core.make_key('wrong')}") * 3)
        a, b, third = c.responses()
        assert [a.code, b.code] == ["key_invalid", "key_invalid"]
        check(g, third, "rate_limited", closes=False)
        assert int(third.header("retry-after")) >= 1 and third.header("www-authenticate") is None
        assert g.request(get("/k/x", f"X-Api-Key: {good}"), peer="198.51.100.30").status == 200, \
            "a valid key is never locked out"
    finally:
        g.close()


@provokes("rate_limited")
def test_rate_limited_when_the_address_table_is_full():
    arena = core.Arena.create(key_capacity=16, rate_capacity=16)
    g = Gateway(RATES.replace('ip_limits = ["1/month"]', 'ip_limits = ["1000/month"]'), arena=arena)
    try:
        for i in range(1, 250):
            r = g.request(get("/limited/x"), peer=f"198.51.{i // 250}.{i % 250}")
            if r.status != 200:
                break
        else:
            pytest.fail("the address table never filled up")
        check(g, r, "rate_limited", closes=False)
        assert r.header("retry-after") == "1" and r.header("ratelimit-limit") is None
        assert "full" in r.json()["error"]["message"]
    finally:
        g.close()


# -- upstream -------------------------------------------------------------------------------------


@provokes("upstream_unavailable")
def test_upstream_unavailable_when_the_connect_fails(gw):
    gw.upstream.fail = ConnectionRefusedError(111, "refused")
    c = gw.client().send(get("/a"))
    check(gw, c.response(), "upstream_unavailable", closes=False)
    assert gw.worker.upstream_counts()[next(iter(gw.worker.targets))][2] == 1  # a connect error counted
    gw.upstream.fail = None
    assert c.send(get("/b")).responses()[-1].status == 200


@provokes("upstream_unavailable")
def test_upstream_unavailable_when_the_upstream_closes_before_answering(gw):
    gw.upstream.respond = None
    c = gw.client().send(get("/a"))
    gw.upstream.links[0].close()
    check(gw, c.response(), "upstream_unavailable", closes=False)


@provokes("upstream_unavailable")
def test_upstream_unavailable_for_an_invalid_response(gw):
    gw.upstream.respond = lambda link, req: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    c = gw.client().send(get("/a"))
    check(gw, c.response(), "upstream_unavailable")
    assert gw.upstream.links[0].transport.ended in ("abort", "rst")


@provokes("upstream_timeout")
def test_upstream_timeout_waiting_for_the_answer(gw):
    gw.upstream.respond = None
    c = gw.client().send(get("/slow"))
    gw.advance(4.0)
    assert c.out == b""
    gw.advance(2.0)  # past read_timeout (5 s)
    check(gw, c.response(), "upstream_timeout", closes=False)
    assert gw.upstream.links[0].transport.ended == "rst"


@provokes("upstream_timeout")
def test_upstream_timeout_connecting(gw):
    gw.upstream.hang = True
    c = gw.client().send(get("/a"))
    assert c.out == b""
    gw.advance(2.5)  # past connect_timeout (2 s)
    check(gw, c.response(), "upstream_timeout", closes=False)


@provokes("upstream_cut")
def test_upstream_cut_mid_response_aborts_the_client(gw):
    # not a reply: a response already started can only be cut, never made to look complete
    gw.upstream.respond = lambda link, req: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10
    c = gw.client().send(get("/cut"))
    assert c.out.startswith(b"HTTP/1.1 200 OK\r\n") and not c.closed
    gw.upstream.links[0].close()
    assert c.transport.ended == "abort" and c.responses() == []
    assert gw.worker.upstream_cuts == 1
    assert gw.decisions()[("open", 2, STAGE_OF["upstream_cut"])] == 1


@provokes("client_closed")
def test_client_closed_mid_exchange_resets_the_upstream(gw):
    # never sent (nginx's 499): the exchange is still counted, and the upstream leg is reset
    gw.upstream.respond = None
    c = gw.client().send(get("/a"))
    c.hang_up()
    assert gw.upstream.links[0].transport.ended == "rst"
    assert gw.decisions()[("open", 4, STAGE_OF["client_closed"])] == 1


# -- overloaded and internal ----------------------------------------------------------------------


@provokes("overloaded")
def test_overloaded_at_the_connection_cap():
    g = Gateway(BASE.replace("[server]", "[server]\nmax_connections = 1"))
    try:
        busy = g.client().send(b"GET / HTTP/1.1\r\nHo")  # a head arriving: not idle, never shed
        refused = g.client()
        r = refused.response()
        assert (r.status, r.code, r.header("retry-after")) == (503, "overloaded", "1")
        assert r.closes and refused.closed and g.worker.conns_refused == 1
        assert not busy.closed
        busy.send(b"st: gw\r\n\r\n")
        assert busy.response().status == 200
    finally:
        g.close()


@provokes("overloaded")
@pytest.mark.skipif(core.IMPLEMENTATION != "cython", reason="the pure-Python twin shares no memory with a child")
def test_overloaded_while_a_keys_record_is_being_written():
    # A writer killed inside the write of a key's record (the core's test-only
    # crash hook): the core fails closed with KEY_BUSY, the gateway says 503
    # overloaded, retry -- until the writer role is handed on.
    from fastgate import _core

    arena = core.Arena.create(key_capacity=16, rate_capacity=64)
    g = Gateway(arena=arena)
    try:
        key = g.add_key("busy", scopes=["GET /k/*"])
        rec = g.key_records["busy"]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                os.read(r, 1)
                _core._set_crash_hook(1)
                keysync.apply(g.worker.keys, msgspec.structs.replace(rec, scopes=["GET /other/*"]))
            finally:
                os._exit(2)
        os.close(r)
        arena.set_writer(pid)
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 70, "the write did not die half way"
        resp = g.request(get("/k/x", f"X-Api-Key: {key}"))
        check(g, resp, "overloaded", closes=False)
        assert resp.header("retry-after") == "1"
        arena.set_writer(os.getpid())  # the role is handed on: the record is the old one again
        assert g.request(get("/k/x", f"X-Api-Key: {key}")).status == 200
    finally:
        g.close()


@provokes("internal_error")
def test_internal_error_when_a_stage_has_a_bug(gw, caplog):
    from fastgate._http import Stage

    class Broken(Stage):  # a stage written in Python, as pipeline.py allows
        name = "broken"

        def run(self, ex):
            raise RuntimeError("a bug in a stage")

    for route in gw.worker.router.routes:
        route.stages = (Broken(route, gw.worker),) + tuple(route.stages)
    c = gw.client().send(get("/a") + get("/b"))
    r = c.response()
    check(gw, r, "internal_error", closes=True)
    assert c.closed and gw.upstream.received == b""
    assert "bug while handling a request" in caplog.text


# -- every reply's framing --------------------------------------------------------------------


def test_a_local_reply_to_head_has_the_length_and_no_body(gw):
    c = gw.client().send(get("/k/x", method="HEAD") + get("/k/y"))
    head, full = c.responses(["HEAD", "GET"])
    assert head.status == 401 and head.body == b"" and int(head.header("content-length")) == len(full.body)
    assert full.code == "key_missing"


def test_a_local_reply_to_http10_closes(gw):
    c = gw.client().send(get("/k/x", version="1.0"))
    r = c.response()
    assert r.code == "key_missing" and r.closes and c.closed


def test_a_refusal_with_an_unread_body_closes(gw):
    # the body was not read: the connection cannot be reused
    c = gw.client().send(get("/k/x", "Content-Length: 50", method="POST"))
    assert c.response().closes and c.closed


# -- the table --------------------------------------------------------------------------------------

SOURCES = ("fastgate/_http.pyx", "fastgate/http/proxy.pxi", "fastgate/http/stages.pxi", "fastgate/http/out.pxi",
           "fastgate/http/meter.pxi", "fastgate/workers/worker.py", "fastgate/pipeline.py")


def test_every_error_code_is_provoked_here_or_never_sent():
    assert not set(PROVOKED) & set(NOT_SENT)
    missing = set(ERRORS) - set(PROVOKED) - set(NOT_SENT)
    assert not missing, f"error codes without a data-plane test (add one, or a reason in NOT_SENT): {sorted(missing)}"
    assert set(PROVOKED) | set(NOT_SENT) == set(ERRORS), "a test names a code the table does not have"
    # what NOT_SENT claims is checked: the data plane's sources never name those codes
    root = Path(__file__).resolve().parents[2]
    text = "".join((root / p).read_text() for p in SOURCES)
    produced = set(re.findall(r'"([a-z_]+)"', text)) | set(core.ERROR_CODE.values())
    for code in NOT_SENT:
        assert code not in produced, f"{code} is in NOT_SENT but the data plane names it: test it here"
    for code in PROVOKED:
        assert STAGE_OF[code] != "admin"
