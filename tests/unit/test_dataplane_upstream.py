"""The upstream side of the data plane without sockets: the fake upstream
(tests/unit/dataplane_kit.py) answers through the upstream protocol's
data_received/connection_lost, and what the client reads is checked with an
independent parser -- response framing, the pool, timers, backpressure and
what the upstream is sent."""

from __future__ import annotations

import pytest
from dataplane_kit import BASE, Gateway, httptools_agrees


@pytest.fixture
def gw():
    g = Gateway()
    g.upstream.respond = None  # these tests answer by hand
    yield g
    g.close()


def get(path="/", *fields, method="GET", version="1.1", body=b""):
    head = f"{method} {path} HTTP/{version}\r\n" + ("Host: gw\r\n" if version == "1.1" else "")
    return (head + "".join(f + "\r\n" for f in fields)).encode() + b"\r\n" + body


def link(gw, n=-1):
    return gw.upstream.links[n]


# -- response framing ----------------------------------------------------------------------------


def test_a_content_length_response_passes_through(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Up: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
                   b"hel")
    assert c.responses() == [], "the body is incomplete"
    link(gw).reply(b"lo")
    r = c.response()
    assert (r.status, r.body, r.framing) == (201, b"hello", "length")
    assert r.header("x-up") == "1" and r.all("set-cookie") == ["a=1", "b=2"]
    assert r.header("x-request-id") == link(gw).requests[0].header("x-request-id")
    httptools_agrees(c.out, [r])


def test_a_chunked_response_is_rechunked(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n")
    link(gw).reply(b"e\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n")
    r = c.response()
    assert (r.framing, r.body) == ("chunked", b"wikipedia in\r\n\r\nchunks.")
    assert b"ext=1" not in c.out and b"X-Trailer" not in c.out, "extensions and trailers are not passed on"
    httptools_agrees(c.out, [r])
    # and the connection goes back to the pool
    c.send(get("/b"))
    assert gw.upstream.connects == 1 and [q.url for q in link(gw).requests] == ["/a", "/b"]


def test_a_close_delimited_response_becomes_chunked_for_an_http11_client(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of ")
    link(gw).reply(b"it")
    assert c.responses() == []
    link(gw).close()
    r = c.response()
    assert (r.framing, r.body) == ("chunked", b"all of it")
    assert not c.closed, "the client's connection outlives the upstream's"
    c.send(get("/b"))
    assert gw.upstream.connects == 2, "a connection that ended its response by closing is never reused"


@pytest.mark.parametrize("upstream_framing", ["close", "chunked", "length"])
def test_an_http10_client(gw, upstream_framing):
    c = gw.client().send(get("/a", version="1.0"))
    if upstream_framing == "close":
        link(gw).reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nold client")
        link(gw).close()
    elif upstream_framing == "chunked":
        link(gw).reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nold\r\n7\r\n client\r\n0\r\n\r\n")
    else:
        link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nold client")
    assert c.closed, "HTTP/1.0 without keep-alive: the gateway closes"
    r = c.response()
    assert r.body == b"old client" and r.closes
    assert r.framing == ("length" if upstream_framing == "length" else "close"), "no chunked to an HTTP/1.0 client"
    assert b"transfer-encoding" not in c.out.lower()


def test_head_responses_have_no_body_and_the_connection_is_not_pooled(gw):
    c = gw.client().send(get("/a", method="HEAD"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n")
    r = c.response("HEAD")
    assert (r.status, r.header("content-length"), r.body) == (200, "1234", b"")
    assert c.out.endswith(b"\r\n\r\n")
    first = link(gw)
    assert first.transport.ended == "fin", "an upstream may send a body to HEAD anyway: never reuse it"
    c.send(get("/b"))
    assert gw.upstream.connects == 2
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [x.body for x in c.responses(["HEAD", "GET"])] == [b"", b"ok"]


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses(gw, status):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 %d Whatever\r\nETag: \"x\"\r\n\r\n" % status)
    r = c.response()
    assert (r.status, r.body, r.header("etag")) == (status, b"", '"x"')
    assert b"transfer-encoding" not in c.out.lower()
    c.send(get("/b"))
    assert gw.upstream.connects == 1, "the connection is reusable after a response without a body"


def test_interim_responses_from_the_upstream_are_not_passed_on(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [r.status for r in c.responses()] == [200]


def test_the_clients_connection_close_reaches_the_response_not_the_pool(gw):
    c = gw.client().send(get("/a", "Connection: close"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    r = c.response()
    assert r.closes and c.closed
    assert "close" not in (link(gw).requests[0].header("connection") or "")
    assert link(gw).transport.ended == "", "the upstream connection is still good: pooled"
    gw.client().send(get("/b"))
    assert gw.upstream.connects == 1


# -- failures ------------------------------------------------------------------------------------


def test_an_upstream_closing_early_is_502_and_a_cut_body_is_never_complete(gw):
    c = gw.client().send(get("/a"))
    link(gw).close()
    assert (c.response().status, c.response().code) == (502, "upstream_unavailable")
    c2 = gw.client().send(get("/b"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    link(gw).close()
    assert c2.transport.ended == "abort" and not c2.out.endswith(b"0\r\n\r\n")


def test_a_stale_pooled_connection_is_retried_once_for_an_idempotent_request(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    # the pooled connection died unseen: the request written to it gets no byte back
    c.send(get("/b"))
    stale = link(gw)
    assert [q.url for q in stale.requests] == ["/a", "/b"]
    stale.close()
    assert gw.upstream.connects == 2 and [q.url for q in link(gw).requests] == ["/b"]
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert [r.body for r in c.responses()] == [b"1", b"2"]


def test_a_request_with_a_body_is_never_retried(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    c.send(get("/b", "Content-Length: 3", method="POST", body=b"abc"))
    link(gw).close()
    assert gw.upstream.connects == 1
    assert c.responses()[-1].code == "upstream_unavailable"


def test_the_read_timeout_runs_between_reads_not_over_the_response(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\na")
    for piece in (b"b", b"c"):
        gw.advance(4.0)  # under read_timeout (5 s) each time, 8 s in all
        link(gw).reply(piece)
    assert c.response().body == b"abc"


def test_an_upstream_timeout_resets_the_upstream_and_the_next_request_dials_afresh(gw):
    c = gw.client().send(get("/a"))
    gw.advance(6.0)
    assert c.response().code == "upstream_timeout"
    assert link(gw).transport.ended == "rst"
    c.send(get("/b"))
    assert gw.upstream.connects == 2


# -- the pool ------------------------------------------------------------------------------------


def test_connections_are_reused_across_clients_and_expire_when_idle(gw):
    gw.upstream.respond = lambda lk, req: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for _ in range(3):
        assert gw.request(get("/a")).status == 200
    assert gw.upstream.connects == 1 and len(link(gw).requests) == 3
    (connects, reuses, errors), = gw.worker.upstream_counts().values()
    assert (connects, reuses, errors) == (1, 2, 0)
    gw.advance(31.0)  # idle_timeout (30 s)
    assert link(gw).transport.ended == "fin", "an expired pooled connection is closed"
    assert gw.request(get("/b")).status == 200 and gw.upstream.connects == 2


def test_a_pooled_connection_that_speaks_unasked_is_closed(gw):
    gw.upstream.respond = lambda lk, req: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert gw.request(get("/a")).status == 200
    pooled = link(gw)
    pooled.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert pooled.transport.ended == "fin"
    r = gw.request(get("/b"))
    assert r.body == b"ok" and gw.upstream.connects == 2


def test_two_clients_never_share_an_upstream_connection_at_once(gw):
    a = gw.client().send(get("/a"))
    b = gw.client().send(get("/b"))
    assert gw.upstream.connects == 2
    link(gw, 1).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    link(gw, 0).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    assert (a.response().body, b.response().body) == (b"A", b"B")


# -- what the upstream is sent ---------------------------------------------------------------------

REWRITE = BASE + """
[[routes]]
name = "strip"
path = "/api/v1"
upstream = "u"
auth = "none"
strip_path = true

[[routes]]
name = "keep"
path = "/host"
upstream = "u"
auth = "none"
preserve_host = true
"""


def test_what_the_upstream_sees():
    g = Gateway(REWRITE)
    try:
        key = g.add_key("who", scopes=["GET /k/*"])
        g.request(get("/k/x?a=1", f"X-Api-Key: {key}", "X-Forwarded-For: 6.6.6.6", "X-Real-IP: 6.6.6.6",
                      "Keep-Alive: timeout=5", "Connection: keep-alive, X-Secret", "X-Secret: s", "X-Kept: yes"),
                  peer="198.51.100.5")
        q = g.upstream.requests[-1]
        assert q.url == "/k/x?a=1" and q.header("host") == "10.9.9.9:8080"
        assert q.header("x-forwarded-for") == "198.51.100.5", "an untrusted peer's X-Forwarded-For is replaced"
        assert q.header("x-real-ip") is None and q.header("keep-alive") is None and q.header("x-secret") is None
        assert q.header("x-kept") == "yes"
        assert q.header("x-fastgate-key-id") == "who" and q.header("x-fastgate-owner") == "acme"
        assert q.header("x-api-key") is None and key not in g.upstream.received.decode()
        g.request(get("/api/v1/users/7"))
        assert g.upstream.requests[-1].url == "/users/7"
        g.request(get("/host/x"))
        assert g.upstream.requests[-1].header("host") == "gw"
    finally:
        g.close()


def test_a_chunked_request_within_the_buffer_goes_up_with_a_length(gw):
    c = gw.client().send(get("/a", "Transfer-Encoding: chunked", method="POST") + b"5\r\nhello\r\n")
    assert gw.upstream.connects == 0, "nothing goes upstream before the buffered body is whole"
    c.send(b"6\r\n world\r\n0\r\n\r\n")
    q = link(gw).requests[0]
    assert (q.body, q.header("content-length"), q.header("transfer-encoding")) == (b"hello world", "11", None)


def test_expect_100_continue_is_answered_after_admission(gw):
    c = gw.client().send(get("/a", "Content-Length: 5", "Expect: 100-continue", method="POST"))
    assert c.out == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(b"hello")
    assert link(gw).requests[0].body == b"hello" and link(gw).requests[0].header("expect") is None
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [r.status for r in c.responses(["POST"])] == [100, 200]


def test_a_large_body_streams_rechunked():
    g = Gateway(BASE.replace('request_buffer = "64k"', 'request_buffer = "1k"'))
    try:
        g.upstream.respond = None
        c = g.client().send(get("/a", "Transfer-Encoding: chunked", method="POST") + b"600\r\n" + b"a" * 0x600
                            + b"\r\n")
        assert g.upstream.connects == 1
        c.send(b"3\r\nxyz\r\n0\r\n\r\n")
        q = link(g).requests[0]
        assert q.header("transfer-encoding") == "chunked" and q.body == b"a" * 0x600 + b"xyz"
        link(g).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert c.response().status == 200
    finally:
        g.close()


# -- backpressure -------------------------------------------------------------------------------------


def test_a_slow_client_pauses_the_upstream(gw):
    c = gw.client().send(get("/a"))
    link(gw).reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    c.pause_writing()
    assert not link(gw).transport.reading
    c.resume_writing()
    assert link(gw).transport.reading
    link(gw).reply(b"world")
    assert c.response().body == b"helloworld"


def test_a_slow_upstream_pauses_the_client(gw):
    c = gw.client().send(get("/a", "Content-Length: 100000", method="POST", body=b"x" * 70000))
    up = link(gw)
    up.pause_writing()
    assert not c.transport.reading
    up.resume_writing()
    assert c.transport.reading
    c.send(b"y" * 30000)
    assert len(up.requests[0].body) == 100000


# -- upgrades ----------------------------------------------------------------------------------------


def test_a_websocket_upgrade_becomes_a_byte_pipe(gw):
    c = gw.client().send(get("/ws", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Key: abc",
                             "Sec-WebSocket-Version: 13") + b"early")
    up = link(gw)
    assert up.requests[0].header("upgrade") == "websocket"
    assert not up.received.endswith(b"early"), "bytes after the head wait for the 101"
    up.reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhi")
    assert up.received.endswith(b"early")
    assert c.out.startswith(b"HTTP/1.1 101 ") and c.out.endswith(b"hi")
    c.send(b"ping")
    up.reply(b"pong")
    assert up.received.endswith(b"earlyping") and c.out.endswith(b"hipong")
    up.close()
    assert c.transport.ended == "fin"


def test_an_upgrade_the_upstream_declines_is_an_ordinary_response(gw):
    c = gw.client().send(get("/ws", "Connection: Upgrade", "Upgrade: websocket") + b"early")
    link(gw).reply(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\nno")
    r = c.response()
    assert (r.status, r.body) == (400, b"no") and r.closes and c.closed
    assert b"early" not in link(gw).received
