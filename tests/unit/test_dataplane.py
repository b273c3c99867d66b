"""The data plane without sockets (issue 11, must-have 5): pipelining, framing
refusals and stage order, bytes in and bytes out through fake transports
(tests/unit/dataplane_kit.py). The integration suite covers the same ground
over real sockets; these run in a fraction of a second and can afford to try
every split of the input and every combination of failures."""

from __future__ import annotations

import itertools

import pytest
from dataplane_kit import BASE, Gateway, httptools_agrees, parse_responses
from test_parser import BAD_CHUNKS, BAD_HEADS

from fastgate import pipeline
from fastgate.errors import ERRORS, STAGE_OF


@pytest.fixture
def gw():
    g = Gateway()
    yield g
    g.close()


def assert_refusal(r, code, why=""):
    """A local reply per DESIGN.md: the status of the error table, the JSON
    error code, and the request id in the body and in x-request-id."""
    assert (r.status, r.code) == (ERRORS[code][0], code), (why, r.raw)
    assert r.header("content-type") == "application/json"
    err = r.json()["error"]
    assert err["request_id"] == r.header("x-request-id") and err["message"]


# A pipeline with every kind of framing: chunked with extensions and trailers,
# Content-Length, none, and HEAD.
PIPELINE = (
    b"POST /a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;e=\"v\"\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    b"PUT /b HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nwxyz"
    b"GET /c?q=1 HTTP/1.1\r\nHost: gw\r\n\r\n"
    b"HEAD /d HTTP/1.1\r\nHost: gw\r\n\r\n"
    b"DELETE /e HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"
)
PIPELINE_METHODS = ["POST", "PUT", "GET", "HEAD", "DELETE"]
PIPELINE_SEEN = [("POST", "/a", "abcde"), ("PUT", "/b", "wxyz"), ("GET", "/c?q=1", ""), ("DELETE", "/e", "")]


def answered(client):
    """(status, the upstream's echo of method/url/body, and whether the
    response's request id is the one the upstream got) per response."""
    out = []
    for r in client.responses(PIPELINE_METHODS):
        if r.body:
            echo = r.json()
            out.append((r.status, echo["method"], echo["url"], echo["body"], echo["rid"] == r.header("x-request-id")))
        else:
            out.append((r.status, r.header("content-length")))
    return out


# -- pipelining -----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_pipeline_in_one_read_is_answered_in_order(loop):
    g = Gateway(loop=loop)
    try:
        c = g.client().send(PIPELINE)
        got = c.responses(PIPELINE_METHODS)
        assert [r.status for r in got] == [200] * 5
        assert [(q.method, q.url, q.body.decode()) for q in g.upstream.requests] == \
            [(m, u, b) for m, u, b in PIPELINE_SEEN[:3]] + [("HEAD", "/d", "")] + [PIPELINE_SEEN[3]]
        # each response carries the request id its request went upstream with
        for r, q in zip(got, g.upstream.requests):
            assert r.header("x-request-id") == q.header("x-request-id")
            if r.body:
                assert r.json()["url"] == q.url
        assert len({r.header("x-request-id") for r in got}) == 5
        # the chunked body went up whole, with a length (it fit the request buffer)
        first = g.upstream.requests[0]
        assert first.header("content-length") == "5" and first.header("transfer-encoding") is None
        assert first.header("t") is None, "trailers never become fields"
        # one upstream connection reused up to the HEAD (a connection that
        # answered HEAD is never pooled), a fresh one after it; the client's stays open
        assert [[q.url for q in link.requests] for link in g.upstream.links] == [["/a", "/b", "/c?q=1", "/d"], ["/e"]]
        assert not c.closed
    finally:
        g.close()


def test_a_pipeline_split_at_every_byte_boundary_gives_the_same_answers(gw):
    whole = gw.client().send(PIPELINE)
    want = [(r[0],) + r[1:4] if len(r) == 5 else r for r in answered(whole)]
    assert len(want) == 5
    for cut in range(1, len(PIPELINE)):
        c = gw.client().send(PIPELINE, [cut])
        got = [(r[0],) + r[1:4] if len(r) == 5 else r for r in answered(c)]
        assert got == want, cut
        assert all(r[4] for r in answered(c) if len(r) == 5)
    bytewise = gw.client().feed_bytewise(PIPELINE)
    assert [(r[0],) + r[1:4] if len(r) == 5 else r for r in answered(bytewise)] == want


def test_bytes_out_are_valid_http_for_an_independent_parser(gw):
    c = gw.client().send(PIPELINE.replace(b"HEAD /d", b"GET /d"))
    got = c.responses()
    assert len(got) == 5
    httptools_agrees(c.out, got)


def test_only_one_request_of_a_connection_is_upstream_at_a_time(gw):
    gw.upstream.respond = None
    c = gw.client().send(b"GET /1 HTTP/1.1\r\nHost: gw\r\n\r\nGET /2 HTTP/1.1\r\nHost: gw\r\n\r\n"
                         b"GET /3 HTTP/1.1\r\nHost: gw\r\n\r\n")
    (link,) = gw.upstream.links
    for n in (1, 2, 3):
        assert [q.url for q in link.requests] == [f"/{i}" for i in range(1, n + 1)]
        assert len(c.responses()) == n - 1, "an answer never goes out before the one ahead of it"
        link.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % n)
    assert [r.body for r in c.responses()] == [b"1", b"2", b"3"]
    assert gw.upstream.connects == 1


def test_answers_go_out_in_request_order_whatever_the_upstream_does(gw):
    gw.upstream.respond = None
    c = gw.client().send(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\nGET /k/nokey HTTP/1.1\r\nHost: gw\r\n\r\n")
    # the second is refused locally, but its answer waits for the first
    assert c.out == b""
    gw.upstream.links[0].reply(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
    first, second = c.responses()
    assert first.body == b"slow"
    assert_refusal(second, "key_missing")
    assert not c.closed


def test_a_refused_request_mid_pipeline(gw):
    # earlier ones answered first, then the error, then close; the rest never reach the upstream
    wire = (b"GET /good1 HTTP/1.1\r\nHost: gw\r\n\r\n"
            b"POST /good2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /bad HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0x0\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n")
    for cuts in ([], [len(wire) - 60], range(1, len(wire))):
        g = Gateway()
        try:
            c = g.client().send(wire, cuts)
            got = c.responses()
            assert [r.status for r in got] == [200, 200, 400]
            assert [r.json()["url"] for r in got[:2]] == ["/good1", "/good2"]
            assert_refusal(got[2], "bad_request")
            assert got[2].closes and c.closed
            assert [q.url for q in g.upstream.requests] == ["/good1", "/good2"]
            assert not g.upstream.saw(b"/bad") and not g.upstream.saw(b"/smuggled")
        finally:
            g.close()


def test_a_bad_head_mid_pipeline_waits_for_the_answers_before_it(gw):
    gw.upstream.respond = None
    c = gw.client().send(b"GET /first HTTP/1.1\r\nHost: gw\r\n\r\n"
                         b"GET /second HTTP/1.1\r\nHost: gw\r\nX: a\r\n b\r\n\r\n")
    assert c.out == b"" and not c.closed
    gw.upstream.links[0].reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    first, second = c.responses()
    assert first.body == b"ok"
    assert_refusal(second, "bad_request")
    assert c.closed and [q.url for q in gw.upstream.requests] == ["/first"]


def test_a_local_reply_mid_pipeline_keeps_the_connection(gw):
    c = gw.client().send(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\nGET /k/x HTTP/1.1\r\nHost: gw\r\n\r\n"
                         b"GET /b HTTP/1.1\r\nHost: gw\r\n\r\n")
    got = c.responses()
    assert [r.status for r in got] == [200, 401, 200]
    assert not got[1].closes and not c.closed
    assert [q.url for q in gw.upstream.requests] == ["/a", "/b"]


def test_a_body_is_never_read_as_the_next_request(gw):
    inner = b"GET /inner HTTP/1.1\r\nHost: gw\r\n\r\n"
    wire = b"POST /outer HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(inner), inner)
    r = gw.request(wire)
    assert r.json()["body"] == inner.decode()
    assert [q.url for q in gw.upstream.requests] == ["/outer"]


def test_connection_close_ends_the_pipeline(gw):
    c = gw.client().send(b"GET /a HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: gw\r\n\r\n")
    (r,) = c.responses()
    assert r.closes and c.closed
    assert [q.url for q in gw.upstream.requests] == ["/a"]


def test_http10_keep_alive_and_close(gw):
    c = gw.client().send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    a, b = c.responses()
    assert a.header("connection") == "keep-alive" and b.closes and c.closed


# -- framing refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_HEADS)
def test_bad_heads_are_refused_and_nothing_goes_upstream(gw, case):
    raw, code = BAD_HEADS[case]
    for cuts in ([], range(1, len(raw))):
        c = gw.client().send(raw, cuts)
        r = c.response()
        assert_refusal(r, code)
        assert r.closes and c.closed
    assert gw.upstream.connects == 0 and gw.upstream.received == b""
    assert gw.decisions() == {("", ERRORS[code][0] // 100, "parse"): 2}


CHUNKED = b"POST /p HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("case", BAD_CHUNKS)
def test_bad_chunk_framing_is_refused_whatever_the_reads(gw, case):
    raw = CHUNKED + BAD_CHUNKS[case]
    code = "headers_too_large" if "10,000" in case else "bad_request"
    step = max(1, len(raw) // 200)  # every cut for the short ones, 200 cuts of the long ones
    reads = max(7, len(raw) // 100)  # and in many small reads
    for cuts in itertools.chain([[]], ([cut] for cut in range(1, len(raw), step)), [range(1, len(raw), reads)]):
        c = gw.client().send(raw, cuts)
        r = c.response()
        assert_refusal(r, code)
        assert c.closed
    # within request_buffer nothing is forwarded before the body is whole and valid
    assert gw.upstream.connects == 0 and gw.upstream.received == b""


INTEGRATION_AMBIGUOUS = {  # tests/integration/test_h_framing.py test_ambiguous_framing_in_the_head
    "CL+TE": b"POST /m HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n",
    "TE+CL": b"POST /m HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    "two CL": b"POST /m HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "TE list": b"POST /m HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "obs-fold": b"POST /m HTTP/1.1\r\nHost: gw\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"POST /m HTTP/1.1\r\nHost: gw\nContent-Length: 0\r\n\r\n",
    "NUL in value": b"GET /m HTTP/1.1\r\nHost: gw\r\nX: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("case", INTEGRATION_AMBIGUOUS)
def test_ambiguous_framing_after_a_good_request_on_the_same_connection(gw, case):
    c = gw.client().send(b"GET /ok HTTP/1.1\r\nHost: gw\r\n\r\n" + INTEGRATION_AMBIGUOUS[case])
    ok, refused = c.responses()
    assert ok.status == 200
    assert_refusal(refused, "bad_request")
    assert c.closed and [q.url for q in gw.upstream.requests] == ["/ok"] and not gw.upstream.saw(b"/m")


def test_a_framing_error_in_a_later_read_within_the_buffer_sends_nothing(gw):
    c = gw.client().send(CHUNKED + b"3\r\nabc\r\n")
    assert gw.upstream.connects == 0 and c.out == b""
    c.send(b"5\r\nhello\n")
    assert_refusal(c.response(), "bad_request")
    assert gw.upstream.received == b""


STREAM = BASE + """
[[routes]]
name = "stream"
path = "/stream"
upstream = "u"
auth = "none"
request_buffer = 1024
"""


def test_a_late_framing_error_in_a_streamed_body_resets_the_upstream():
    g = Gateway(STREAM)
    try:
        piece = b"a" * 600
        c = g.client().send(b"POST /stream/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + b"%x\r\n%s\r\n" % (len(piece), piece) * 3)
        (link,) = g.upstream.links
        assert link.received.startswith(b"POST /stream/x HTTP/1.1\r\n"), "past request_buffer the body streams"
        assert b"transfer-encoding: chunked\r\n" in link.received
        c.send(b"5\r\nhello\n")  # bare LF after the data
        assert_refusal(c.response(), "bad_request")
        assert link.transport.ended == "rst", "the upstream must never take the body for complete"
        assert not link.received.endswith(b"0\r\n\r\n") and link.requests == []
        # and that connection is never pooled: the next request dials afresh
        assert g.request(b"GET /after HTTP/1.1\r\nHost: gw\r\n\r\n").status == 200
        assert g.upstream.connects == 2
    finally:
        g.close()


def test_a_body_crossing_the_buffer_in_the_read_that_breaks_it_never_streams():
    g = Gateway(STREAM)
    try:
        c = g.client().send(b"POST /stream/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        piece = b"a" * 600
        c.send(b"%x\r\n%s\r\n" % (len(piece), piece) * 3 + b"5\r\nhello\n")
        assert_refusal(c.response(), "bad_request")
        assert g.upstream.received == b""
    finally:
        g.close()


def test_trailers_never_smuggle_a_key_into_the_next_request(gw):
    key = gw.add_key("t1")
    wire = (CHUNKED + b"3\r\nabc\r\n0\r\nX-Api-Key: " + key.encode() + b"\r\n\r\n"
            b"GET /k/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    first, second = gw.client().send(wire).responses()
    assert first.status == 200
    assert_refusal(second, "key_missing")
    assert [q.url for q in gw.upstream.requests] == ["/p"]
    assert key not in gw.upstream.received.decode()


# -- stage order ---------------------------------------------------------------------------------

ORDER = BASE + """
[ip]
deny = ["203.0.113.0/24"]

[plans.one]
limits = ["1/month"]

[[routes]]
name = "so"
path = "/so"
upstream = "u"
auth = "key"
methods = ["GET", "POST"]
max_body_bytes = 10
"""

# One way to fail each stage that can refuse, on one request:
FAILURES = ("parse", "route", "ip", "limits", "key", "scope", "rate", "upstream")
EXPECTED_CODE = {"parse": "bad_request", "route": "method_not_allowed", "ip": "ip_denied",
                 "limits": "body_too_large", "key": "key_missing", "scope": "scope_denied",
                 "rate": "rate_limited", "upstream": "upstream_unavailable"}


def build(failing: set, good_key: str, spent_key: str) -> tuple[bytes, str]:
    method = "DELETE" if "route" in failing else "GET"
    path = "/so/other" if "scope" in failing else "/so/ok"
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    if "key" not in failing:
        lines.append(f"X-Api-Key: {spent_key if 'rate' in failing else good_key}")
    if "limits" in failing:
        lines.append("Content-Length: 50")
    if "parse" in failing:
        lines += ["X-Folded: a", " b"]
    peer = "203.0.113.5" if "ip" in failing else "198.51.100.7"
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), peer


def test_the_failure_table_names_the_pipeline():
    assert set(FAILURES) <= set(pipeline.STAGES)
    assert all(STAGE_OF[EXPECTED_CODE[s]] == s for s in FAILURES)


def test_every_combination_of_failures_gets_the_earliest_stages_error():
    g = Gateway(ORDER)
    try:
        good = g.add_key("good", scopes=["GET,POST /so/ok"])
        spent = g.add_key("spent", plan="one", scopes=["GET,POST /so/ok"])
        for n in range(1, len(FAILURES) + 1):
            for failing in itertools.combinations(FAILURES, n):
                failing = set(failing)
                # "rate" is the spent key's only request left being refused: spend it right before
                g.request(b"GET /so/ok HTTP/1.1\r\nHost: gw\r\nX-Api-Key: %s\r\n\r\n" % spent.encode(),
                          peer="198.51.100.7")
                raw, peer = build(failing, good, spent)
                if "upstream" in failing:
                    g.upstream.close_all()  # no pooled connection left, and no new one to be had
                    g.upstream.fail = OSError("refused")
                before = g.upstream.requests[:]
                r = g.request(raw, peer=peer)
                first = min(failing, key=pipeline.STAGES.index)
                assert_refusal(r, EXPECTED_CODE[first], f"failing: {sorted(failing, key=pipeline.STAGES.index)}")
                assert g.upstream.requests == before, "a refused request never reaches the upstream"
                g.upstream.fail = None
        # and with nothing failing, it goes through
        raw, peer = build(set(), good, spent)
        assert g.request(raw, peer=peer).status == 200
    finally:
        g.close()


def test_an_oversized_upload_never_spends_quota():
    g = Gateway(ORDER)
    try:
        key = g.add_key("fresh", plan="one", scopes=["POST /so/ok"]).encode()
        big = g.request(b"POST /so/ok HTTP/1.1\r\nHost: gw\r\nX-Api-Key: %s\r\nContent-Length: 50\r\n\r\n" % key)
        assert_refusal(big, "body_too_large")
        ok = g.request(b"POST /so/ok HTTP/1.1\r\nHost: gw\r\nX-Api-Key: %s\r\nContent-Length: 2\r\n\r\nhi" % key)
        assert ok.status == 200, "the 413 must not spend the plan's quota"
        assert_refusal(g.request(b"POST /so/ok HTTP/1.1\r\nHost: gw\r\nX-Api-Key: %s\r\n\r\n" % key), "rate_limited")
    finally:
        g.close()


def test_a_framing_error_in_the_read_beats_every_later_stage():
    # the whole read is parsed before any decision: a head with a bad body in
    # the same read is refused for its framing, even from a denied address
    g = Gateway(ORDER)
    try:
        raw = (b"POST /so/other HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n-0\r\n\r\n")
        r = g.request(raw, peer="203.0.113.9")
        assert_refusal(r, "bad_request")
        assert g.decisions() == {("", 4, "parse"): 1}
    finally:
        g.close()


def test_no_route_beats_ip_and_key():
    no_catch_all = BASE.replace('path = "/"\nupstream', 'path = "/open"\nupstream')
    assert no_catch_all != BASE
    g = Gateway(no_catch_all + '\n[ip]\ndeny = ["203.0.113.0/24"]\n')
    try:
        r = g.request(b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n", peer="203.0.113.1")
        assert_refusal(r, "no_route")
    finally:
        g.close()


def test_a_bad_path_beats_the_key():
    # route stage: a double-encoded dot on a key route is refused before the key is asked for
    g = Gateway()
    try:
        r = g.request(b"GET /k/%252e%252e/admin HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert_refusal(r, "bad_request")
        r = g.request(b"GET /k/%00 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert_refusal(r, "bad_request")
    finally:
        g.close()


def test_responses_parse_strictly():
    # the kit's parser refuses what a strict client would (it checks the gateway, not itself)
    from dataplane_kit import BadResponse

    with pytest.raises(BadResponse):
        parse_responses(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx")
    with pytest.raises(BadResponse):
        parse_responses(b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n")
    got, rest = parse_responses(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", ["POST"])
    assert [r.status for r in got] == [100, 204] and rest == b""


# -- connections -----------------------------------------------------------------------------------


def test_at_the_connection_cap_an_idle_connection_makes_room():
    g = Gateway(BASE.replace("[server]", "[server]\nmax_connections = 1"))
    try:
        idle = g.client().send(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert idle.response().status == 200 and not idle.closed
        new = g.client().send(b"GET /b HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert new.response().status == 200
        assert idle.closed and len(idle.responses()) == 1, "the idle one is closed silently"
        assert g.worker.conns_refused == 0
    finally:
        g.close()


def test_draining_finishes_what_is_in_flight_and_closes(gw):
    gw.upstream.respond = None
    idle = gw.client().send(b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.upstream.links[0].reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
    busy = gw.client().send(b"GET /b HTTP/1.1\r\nHost: gw\r\n\r\n")
    gw.run(gw.worker.drain)
    assert idle.closed and not busy.closed
    gw.upstream.links[0].reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb")
    r = busy.response()
    assert r.body == b"b" and r.closes and busy.closed


def test_a_reload_that_renames_the_key_header_reaches_open_connections():
    """The parser finds the key; a reload that renames [keys] header must reach the parsers
    of connections already open, or their next request would look keyless."""
    import tomllib

    from fastgate.config import build_config

    gw = Gateway()
    try:
        key = gw.add_key("rk")
        c = gw.client()
        c.send(f"GET /k/a HTTP/1.1\r\nHost: gw\r\nX-Api-Key: {key}\r\n\r\n".encode())
        assert c.response().status == 200
        renamed = BASE.replace("[keys]", '[keys]\nheader = "X-Token"') if "[keys]" in BASE \
            else BASE + '\n[keys]\nheader = "X-Token"\n'
        gw.run(lambda: gw.worker.apply(build_config(tomllib.loads(renamed), "test.toml")))
        c.send(f"GET /k/b HTTP/1.1\r\nHost: gw\r\nX-Token: {key}\r\n\r\n".encode())
        r = parse_responses(c.out, ["GET", "GET"])[0][1]
        assert r.status == 200, r.raw
        assert not gw.upstream.saw(key)  # the renamed field is taken off like the old one
    finally:
        gw.close()
