"""fastgate._http.ResponseParser: httptools as the oracle on valid responses,
refusal of ambiguous framing, and the same answer however reads are split."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate._http import EV_BODY, EV_END, EV_ERROR, EV_HEAD, EV_UPGRADE, ResponseParser


def run(data: bytes, splits=(), head=False, upgrade=False, eof=False):
    p = ResponseParser()
    p.start(head, upgrade)
    events, prev = [], 0
    for cut in sorted(set(splits)) + [len(data)]:
        events += p.feed(data[prev:cut])
        prev = cut
    if eof:
        events += p.eof()
    out = []
    for kind, value in zip(events[::2], events[1::2]):
        if kind == EV_HEAD:
            out.append(("head", value.status, value.fields, value.length, value.chunked, value.until_close,
                        value.keep_alive, value.no_body))
        elif kind == EV_BODY:
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + value)
            else:
                out.append(("body", value))
        elif kind == EV_END:
            out.append(("end",))
        elif kind == EV_UPGRADE:
            out.append(("upgrade", value))
        else:
            assert kind == EV_ERROR
            out.append(("error", value[1]))
    return out, p


class Oracle:
    def __init__(self):
        self.headers, self.body, self.done = [], b"", False

    def on_header(self, n, v):
        self.headers.append((n, v))

    def on_body(self, b):
        self.body += b

    def on_message_complete(self):
        self.done = True


TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MANAGED = {"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer",
           "upgrade"}


@st.composite
def response(draw):
    status = draw(st.sampled_from([200, 201, 302, 404, 500, 503]))
    fields = draw(st.lists(st.tuples(st.text(TCHAR, min_size=1, max_size=10).filter(lambda n: n.lower() not in MANAGED),
                                     st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)),
                           max_size=6))
    body = draw(st.binary(max_size=300))
    chunked = draw(st.booleans())
    head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields)
    if chunked:
        raw = b""
        cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=4))))
        prev = 0
        for c in cuts + [len(body)]:
            if body[prev:c]:
                raw += b"%x\r\n%s\r\n" % (c - prev, body[prev:c])
            prev = c
        wire = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + raw + b"0\r\n\r\n"
    else:
        wire = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return wire, fields, body, chunked


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response(), st.data())
def test_agrees_with_httptools(resp, data):
    wire, fields, body, chunked = resp
    o = Oracle()
    httptools.HttpResponseParser(o).feed_data(wire)
    assert o.done
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=5))
    out, p = run(wire, splits)
    assert [x[0] for x in out if x[0] != "body"] == ["head", "end"]
    head = out[0]
    assert head[2] == "".join(f"{n}: {v}\r\n" for n, v in fields).encode()  # passed through as sent
    got = b"".join(x[1] for x in out if x[0] == "body")
    assert got == o.body == body
    assert head[4] == chunked and head[6] and p.idle


def test_hop_by_hop_and_connection_named_fields_are_removed():
    out, _ = run(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: 5\r\nX-Hop: s\r\nX-Keep: 1\r\n"
                 b"Trailer: X\r\nContent-Length: 0\r\n\r\n")
    assert out[0][2] == b"X-Keep: 1\r\n" and out[-1] == ("end",)


def test_framing_rules():
    assert run(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nabc", eof=True)[0] == [
        ("head", 200, b"X: y\r\n", -1, False, True, False, False), ("body", b"abc"), ("end",)]
    assert run(b"HTTP/1.1 204 No Content\r\n\r\n")[0][-1] == ("end",)
    assert run(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")[0][-1] == ("end",)
    # a HEAD response has no body whatever it says
    out, p = run(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head=True)
    assert out[-1] == ("end",) and out[0][7] and p.idle
    # interim responses are skipped
    out, _ = run(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz")
    assert [o[0] for o in out] == ["head", "body", "end"] and out[0][1] == 200
    assert not run(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[0][0][6]


def test_101_only_when_asked_and_keeps_its_fields():
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    out, _ = run(raw + b"frame", upgrade=True)
    assert out[0][2] == b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    assert out[1] == ("upgrade", b"frame")
    assert run(raw, upgrade=True)[0][1] == ("upgrade", b"")  # always an event: the pipe starts here
    assert run(raw)[0][-1][0] == "error"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : a\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
], ids=range(14))
def test_ambiguous_or_malformed_responses_are_errors(raw):
    out, p = run(raw, eof=True)
    assert out[-1][0] == "error" and p.dead, out


def test_bytes_with_no_request_outstanding_are_an_error():
    out, _ = run(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    assert [o[0] for o in out] == ["head", "body", "end", "error"]


def test_split_invariance():
    wire = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    whole = run(wire)[0]
    for cut in range(len(wire) + 1):
        assert run(wire, [cut])[0] == whole
    assert run(wire, range(len(wire)))[0] == whole
