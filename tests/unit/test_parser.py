"""fastgate._http.RequestParser: httptools (llhttp) as the oracle on valid
input, the hardening rules on invalid input, and the same answer however the
bytes are split across reads."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate._http import EV_BODY, EV_END, EV_ERROR, EV_HEAD, EV_UPGRADE, FIELD_NAMES, RequestParser


def run(data: bytes, splits=None, **kw):
    """Feed data (whole, or cut at the given offsets) and return
    [("head", Head), ("body", bytes joined), ("end",), ("error", code, msg, seq), ("upgrade", rest)]."""
    p = RequestParser(**kw)
    events = []
    if splits is None:
        events = p.feed(data)
    else:
        prev = 0
        for cut in sorted(set(splits)) + [len(data)]:
            events += p.feed(data[prev:cut])
            prev = cut
    out = []
    for kind, value in zip(events[::2], events[1::2]):
        if kind == EV_BODY:
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + value)
            else:
                out.append(("body", value))
        elif kind == EV_HEAD:
            out.append(("head", value))
        elif kind == EV_END:
            out.append(("end",))
        elif kind == EV_UPGRADE:
            if out and out[-1][0] == "upgrade":
                out[-1] = ("upgrade", out[-1][1] + value)
            else:
                out.append(("upgrade", value))
        else:
            assert kind == EV_ERROR
            out.append(("error",) + value)
    return out


def summary(out):
    """Comparable form (Head objects are not comparable)."""
    res = []
    for item in out:
        if item[0] == "head":
            h = item[1]
            res.append(("head", h.method, h.path, h.query, h.host, h.version, tuple(h.headers), h.length,
                        h.chunked, h.keep_alive, h.upgrade, h.xff, h.seq))
        else:
            res.append(item)
    return res


def error_of(data: bytes, **kw):
    out = run(data, **kw)
    assert out and out[-1][0] == "error", summary(out)
    # nothing after an error, and the error is the only refusal
    assert [o[0] for o in out].count("error") == 1
    return out[-1][1]


# -- the oracle ------------------------------------------------------------------------


class Oracle:
    """Collects what httptools (llhttp) parses."""

    def __init__(self):
        self.messages = []

    def on_message_begin(self):
        self.messages.append({"url": b"", "headers": [], "body": b"", "complete": False})

    def on_url(self, url):
        self.messages[-1]["url"] += url

    def on_header(self, name, value):
        self.messages[-1]["headers"].append((name, value))

    def on_body(self, body):
        self.messages[-1]["body"] += body

    def on_message_complete(self):
        self.messages[-1]["complete"] = True


TCHAR = "!#$%&'*+-.^`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
token = st.text(alphabet=TCHAR, min_size=1, max_size=12)
field_name = token.filter(lambda s: s.lower().encode() not in FIELD_NAMES and not s.lower().startswith("x-fastgate-"))
field_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=20).map(
    lambda s: s.strip())
path_chars = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,;=:@%", max_size=30)


@st.composite
def valid_request(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    path = "/" + draw(path_chars).replace("%", "%25")
    query = draw(st.one_of(st.just(""), st.text(alphabet="abc=&123%2F", max_size=10).map(lambda q: "?" + q)))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    headers = draw(st.lists(st.tuples(field_name, field_value), max_size=8))
    host = draw(st.sampled_from(["example.com", "127.0.0.1:8080", "[::1]", "a-b.c_d~e:1"]))
    body = draw(st.binary(max_size=200)) if method in ("POST", "PUT", "PATCH") else b""
    framing = draw(st.sampled_from(["length", "chunked"] if version == "1.1" else ["length"])) if body else None
    lines = [f"{method} {path}{query} HTTP/{version}"]
    if version == "1.1" or draw(st.booleans()):
        lines.append(f"Host: {host}")
    for n, v in headers:
        lines.append(f"{n}: {v}")
    raw_body = b""
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        raw_body = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=4))))
        prev = 0
        for cut in cuts + [len(body)]:
            piece = body[prev:cut]
            prev = cut
            if piece:
                ext = draw(st.sampled_from(["", ";a", ";a=b", ';n="q\\"v"']))
                raw_body += b"%x%s\r\n%s\r\n" % (len(piece), ext.encode(), piece)
        trailer = draw(st.sampled_from([b"", b"X-Sum: 1\r\n"]))
        raw_body += b"0\r\n" + trailer + b"\r\n"
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + raw_body, body, headers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_request(), min_size=1, max_size=3), st.data())
def test_agrees_with_httptools_on_valid_pipelines(reqs, data):
    # an HTTP/1.0 request (no keep-alive) ends the connection: nothing after it is read
    for i, r in enumerate(reqs):
        if b" HTTP/1.0\r\n" in r[0].split(b"\r\n", 1)[0] + b"\r\n":
            reqs = reqs[: i + 1]
            break
    wire = b"".join(r[0] for r in reqs)
    oracle = Oracle()
    hp = httptools.HttpRequestParser(oracle)
    hp.feed_data(wire)
    assert len(oracle.messages) == len(reqs) and all(m["complete"] for m in oracle.messages)
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    out = run(wire, splits)
    heads = [o[1] for o in out if o[0] == "head"]
    assert len(heads) == len(reqs)
    assert not any(o[0] == "error" for o in out)
    # bodies, message by message
    bodies, cur = [], None
    for o in out:
        if o[0] == "head":
            if cur is not None:
                bodies.append(cur)
            cur = b""
        elif o[0] == "body":
            cur += o[1]
    bodies.append(cur)
    for h, m, (_, body, headers), got_body in zip(heads, oracle.messages, reqs, bodies):
        assert h.path + h.query == m["url"]
        assert got_body == m["body"] == body
        # every field we forward is one the oracle saw, in order, with its value
        expected = [(n.encode(), v.encode()) for n, v in headers if "_" not in n]
        assert [(x[1], x[2]) for x in h.headers] == expected
        assert all(x[0] == x[1].lower() for x in h.headers)


def test_split_invariance_exhaustive_on_a_pipeline():
    wire = (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;e=\"v\"\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
            b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz"
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    whole = summary(run(wire))
    assert [o[0] for o in whole] == ["head", "body", "end", "head", "body", "end", "head"]
    for cut in range(len(wire) + 1):
        assert summary(run(wire, [cut])) == whole, cut
    assert summary(run(wire, list(range(len(wire))))) == whole


# -- what a request carries ---------------------------------------------------------------


def test_fields_we_manage_are_not_forwarded():
    (h,), = [[o[1] for o in run(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Trailer: X\r\nProxy-Connection: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil\r\nX-Request-ID: abc\r\nX-Fastgate-Key-Id: forged\r\n"
        b"X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: PUT\r\nX-Method-Override: PATCH\r\n"
        b"X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Real-IP: 1.1.1.1\r\nForwarded: for=1.1.1.1\r\n"
        b"X-Client-IP: 1\r\nTrue-Client-IP: 1\r\nCF-Connecting-IP: 1\r\nUpgrade: h2c\r\nExpect: 100-continue\r\n"
        b"X-Kept: yes\r\n\r\n") if o[0] == "head"]]
    assert [x[1] for x in h.headers] == [b"X-Kept"]
    assert h.conn_tokens == [b"x-hop"]
    assert h.xff == b"1.2.3.4" and h.request_id == b"abc"
    assert h.xfp is None and h.xfh is None  # only from a trusted proxy
    assert h.method_override == b"DELETE"
    assert h.upgrade is None and h.expect_continue


def test_trusted_proxy_keeps_client_address_fields():
    out = run(b"GET / HTTP/1.1\r\nHost: x\r\nX-Real-IP: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n", trusted=True)
    h = out[0][1]
    assert [x[1] for x in h.headers] == [b"X-Real-IP"] and h.xfp == b"https"


@pytest.mark.parametrize("name", [b"Transfer_Encoding", b"Content_Length", b"X_Api_Key", b"X_Forwarded_For",
                                  b"X_Fastgate_Key_Id", b"x_http_method_override", b"X_Real_IP"])
def test_underscore_aliases_of_our_fields_are_dropped_even_when_underscores_are_allowed(name):
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n" + name + b": v\r\nA_B: c\r\n\r\n"
    for underscores in (False, True):
        h = run(raw, underscores=underscores)[0][1]
        names = [x[1] for x in h.headers]
        assert name not in names
        assert names == ([b"A_B"] if underscores else [])
        assert h.length == -1 and not h.chunked


def test_key_header_alias_follows_the_configured_name():
    h = run(b"GET / HTTP/1.1\r\nHost: x\r\nMy_Key: v\r\n\r\n", underscores=True, key_header=b"my-key")[0][1]
    assert h.headers == []


def test_keep_alive_rules():
    def ka(raw):
        return run(raw)[0][1].keep_alive
    assert ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert not ka(b"GET / HTTP/1.0\r\n\r\n")
    assert ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")


def test_absolute_form_authority_wins_over_host():
    h = run(b"GET http://Api.Example:81/p/q?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")[0][1]
    assert (h.host, h.path, h.query, h.absolute) == (b"Api.Example:81", b"/p/q", b"?x=1", True)
    h = run(b"GET http://api?x HTTP/1.1\r\nHost: api\r\n\r\n")[0][1]
    assert (h.host, h.path, h.query) == (b"api", b"/", b"?x")


def test_websocket_upgrade_stops_parsing_and_holds_the_rest():
    out = run(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n\x81\x05hello",
              [70, 75])
    assert out[0][1].upgrade == b"websocket"
    assert out[1] == ("upgrade", b"\x81\x05hello")


@pytest.mark.parametrize("upgrade", [b"h2c", b"websocket, h2c", b"foo"])
def test_other_upgrades_are_plain_requests(upgrade):
    out = run(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: " + upgrade
              + b"\r\nHTTP2-Settings: AAA\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    heads = [o[1] for o in out if o[0] == "head"]
    assert len(heads) == 2 and heads[0].upgrade is None
    assert heads[0].conn_tokens == [b"http2-settings"]


def test_empty_lines_before_a_request_are_ignored():
    out = run(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [o[1].path for o in out if o[0] == "head"] == [b"/a", b"/b"]


# -- refusals --------------------------------------------------------------------------------

CHUNKED = b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

BAD_CHUNKS = {
    "0x prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "leading space": b" 5\r\nhello\r\n0\r\n\r\n",
    "plus": b"+5\r\nhello\r\n0\r\n\r\n",
    "minus": b"-5\r\nhello\r\n0\r\n\r\n",
    "underscore": b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "non-hex": b"5g\r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "64-bit overflow": b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    "huge": b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "bare LF in size line": b"5\nhello\r\n0\r\n\r\n",
    "bare CR in size line": b"5\rhello\r\n0\r\n\r\n",
    "bare LF in extension": b"5;a=b\nhello\r\n0\r\n\r\n",
    "bare CR in extension": b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "bare CR after data": b"5\r\nhello\r0\r\n\r\n",
    "missing CRLF after data": b"5\r\nhello0\r\n\r\n",
    "data longer than size": b"3\r\nhello\r\n0\r\n\r\n",
    "NUL extension name": b"5;\x00=1\r\nhello\r\n0\r\n\r\n",
    "quoted extension name": b'5;"a"=1\r\nhello\r\n0\r\n\r\n',
    "whitespace before ;": b"5 ;a=1\r\nhello\r\n0\r\n\r\n",
    "tab before ;": b"5\t;a=1\r\nhello\r\n0\r\n\r\n",
    "whitespace after ;": b"5; a=1\r\nhello\r\n0\r\n\r\n",
    "empty extension value": b"5;a=\r\nhello\r\n0\r\n\r\n",
    "unterminated quoted value": b'5;a="b\r\nhello\r\n0\r\n\r\n',
    "extension too long": b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
    "trailer obs-fold": b"0\r\nX-A: b\r\n c\r\n\r\n",
    "trailer space before colon": b"0\r\nX-A : b\r\n\r\n",
    "trailer content-length": b"0\r\nContent-Length: 5\r\n\r\n",
    "trailer transfer-encoding": b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "trailer content_length alias": b"0\r\nContent_Length: 5\r\n\r\n",
    "trailer host": b"0\r\nHost: evil\r\n\r\n",
    "trailer bare LF": b"0\r\nX-A: b\n\r\n",
    "trailer bare CR": b"0\r\nX-A: b\rc\r\n\r\n",
    "trailer end bare LF": b"0\r\nX-A: b\r\n\n",
    "trailer NUL": b"0\r\nX-A: b\x00\r\n\r\n",
    "10,000 trailer fields": b"0\r\n" + b"X-T: v\r\n" * 10_000 + b"\r\n",
    "last chunk bare LF": b"0\n\r\n",
}


@pytest.mark.parametrize("case", BAD_CHUNKS)
def test_bad_chunk_framing_is_refused(case):
    raw = CHUNKED + BAD_CHUNKS[case]
    whole = run(raw)
    assert whole[0][0] == "head"
    code, _, seq = whole[-1][1:]
    assert whole[-1][0] == "error" and code in ("bad_request", "headers_too_large") and seq == 1
    assert ("end",) not in whole  # the body is never reported complete
    # the same verdict whatever the reads, and never an END before it
    assert summary(run(raw, list(range(0, len(raw), 7)))) [-1][:2] == ("error", code)


BAD_HEADS = {
    # request line
    "lower-case method": (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "two spaces": (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "tab separator": (b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "trailing space": (b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", "bad_request"),
    "lower-case version": (b"GET / http/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "http_version_not_supported"),
    "HTTP/0.9 style": (b"GET /\r\n\r\n", "bad_request"),
    "HTTP/1.10": (b"GET / HTTP/1.10\r\nHost: x\r\n\r\n", "bad_request"),
    "fragment": (b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "raw UTF-8 in target": (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "NUL in target": (b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "asterisk form": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "authority form": (b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "ftp scheme": (b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "userinfo": (b"GET http://a:b@x/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "bare LF request line": (b"GET / HTTP/1.1\nHost: x\r\n\r\n", "bad_request"),
    "bare CR request line": (b"GET / HTTP/1.1\rHost: x\r\n\r\n", "bad_request"),
    # fields
    "bare LF field": (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", "bad_request"),
    "bare LF end": (b"GET / HTTP/1.1\r\nHost: x\r\n\n", "bad_request"),
    "bare CR in value": (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", "bad_request"),
    "NUL in value": (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", "bad_request"),
    "DEL in value": (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", "bad_request"),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", "bad_request"),
    "space before colon": (b"GET / HTTP/1.1\r\nHost: x\r\nX : a\r\n\r\n", "bad_request"),
    "space in name": (b"GET / HTTP/1.1\r\nHost: x\r\nX Y: a\r\n\r\n", "bad_request"),
    "empty name": (b"GET / HTTP/1.1\r\nHost: x\r\n: a\r\n\r\n", "bad_request"),
    "no colon": (b"GET / HTTP/1.1\r\nHost: x\r\nXY\r\n\r\n", "bad_request"),
    # framing
    "CL and TE": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                  "bad_request"),
    "two CL": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", "bad_request"),
    "CL list": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", "bad_request"),
    "CL plus": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", "bad_request"),
    "CL minus": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc", "bad_request"),
    "CL hex": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", "bad_request"),
    "CL empty": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n", "bad_request"),
    "CL inner space": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\n", "bad_request"),
    "CL overflow": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", "bad_request"),
    "TE gzip": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "bad_request"),
    "TE list": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "bad_request"),
    "TE chunked twice": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n", "bad_request"),
    "TE xchunked": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", "bad_request"),
    "TE in HTTP/1.0": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_request"),
    "TE with space before colon": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
                                   "bad_request"),
    # Host
    "no Host": (b"GET / HTTP/1.1\r\n\r\n", "bad_request"),
    "two Host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "bad_request"),
    "empty Host": (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", "bad_request"),
    "Host comma list": (b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", "bad_request"),
    "Host comma": (b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", "bad_request"),
    "Host space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "bad_request"),
    "Host slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "bad_request"),
    "Host userinfo": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", "bad_request"),
    "Host port 0": (b"GET / HTTP/1.1\r\nHost: a:0\r\n\r\n", "bad_request"),
    "Host port 65536": (b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", "bad_request"),
    "Host port letters": (b"GET / HTTP/1.1\r\nHost: a:8o\r\n\r\n", "bad_request"),
    "Host empty port": (b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n", "bad_request"),
    "Host two ports": (b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", "bad_request"),
    "Host semicolon": (b"GET / HTTP/1.1\r\nHost: a;b\r\n\r\n", "bad_request"),
    "Host percent": (b"GET / HTTP/1.1\r\nHost: a%2fb\r\n\r\n", "bad_request"),
    "Host backslash": (b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n", "bad_request"),
    "Host bad IPv6": (b"GET / HTTP/1.1\r\nHost: [::g]\r\n\r\n", "bad_request"),
    "Host IPv6 zone": (b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n", "bad_request"),
    "Host unbracketed IPv6": (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", "bad_request"),
    "Host unclosed bracket": (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "bad_request"),
    "Host NUL": (b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", "bad_request"),
    # upgrades that would tunnel in a way we refuse
    "upgrade with close": (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
                           "upgrade_refused"),
    "upgrade on POST": (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                        b"Content-Length: 0\r\n\r\n", "upgrade_refused"),
    "upgrade with a body": (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                            b"Content-Length: 5\r\n\r\nhello", "upgrade_refused"),
    "upgrade in HTTP/1.0": (b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", "upgrade_refused"),
}


@pytest.mark.parametrize("case", BAD_HEADS)
def test_bad_heads_are_refused(case):
    raw, code = BAD_HEADS[case]
    out = run(raw)
    assert [o[0] for o in out] == ["error"], summary(out)
    assert out[0][1] == code and out[0][3] == 1
    assert summary(run(raw, list(range(len(raw))))) == summary(out)


@pytest.mark.parametrize("host", [b"example.com", b"EXAMPLE.com:443", b"127.0.0.1", b"127.0.0.1:1", b"[::1]",
                                  b"[2001:db8::1]:65535", b"[::ffff:1.2.3.4]", b"a_b.c~d", b"x.", b"localhost:08080"])
def test_valid_hosts(host):
    h = run(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")[0][1]
    assert h.host == host


def test_limits():
    # request line bounded by max_url (414), fields by bytes and count (431)
    assert error_of(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", max_url=100) == "uri_too_long"
    assert error_of(b"GET /" + b"a" * 200, max_url=100) == "uri_too_long"  # without waiting for the line end
    assert error_of(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 300 + b"\r\n\r\n", max_head=200) == \
        "headers_too_large"
    assert error_of(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 300, max_head=200) == "headers_too_large"
    assert error_of(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: a\r\n" * 10 + b"\r\n", max_fields=10) == \
        "headers_too_large"
    run_ok = run(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: a\r\n" * 9 + b"\r\n", max_fields=10)
    assert run_ok[0][0] == "head"
    assert error_of(b"\r\n" * 9 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == "bad_request"


def test_default_limits_fit_real_traffic():
    # 100 ordinary fields, Host, and the key after 200 other fields: all within the defaults
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: value-%d\r\n" % (i, i) for i in range(200)) + \
        b"X-Api-Key: fg_x\r\n\r\n"
    h = run(raw)[0][1]
    assert len(h.headers) == 201 and h.headers[-1][0] == b"x-api-key"


def test_error_seq_names_the_message():
    # a framing error in the 2nd message's body belongs to message 2; a bad 3rd head to message 3
    out = run(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" + CHUNKED + b"zz\r\n")
    assert out[-1][0] == "error" and out[-1][3] == 2
    out = run(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
    assert out[-1][0] == "error" and out[-1][3] == 3


def test_nothing_is_parsed_after_a_message_that_closes_the_connection():
    for first in (b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                  b"POST /1 HTTP/1.0\r\nContent-Length: 2\r\n\r\nab"):
        out = run(first + b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
        assert [o[0] for o in out if o[0] != "body"] in (["head"], ["head", "end"])


def test_parser_is_dead_after_an_error():
    p = RequestParser()
    assert p.feed(b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n")[0] == EV_ERROR
    assert p.dead and p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []


def test_state_for_timers():
    p = RequestParser()
    assert not p.head_pending and not p.in_body
    p.feed(b"GET / HT")
    assert p.head_pending
    p.feed(b"TP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na")
    assert p.in_body and not p.head_pending
    p.feed(b"bc")
    assert not p.in_body and not p.head_pending
