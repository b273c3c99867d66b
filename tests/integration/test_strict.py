"""Strict HTTP/1.1 parsing, limits, timeouts and header hygiene, against a real
multi-worker gateway and a real (aiohttp) upstream.

Every rejection of malformed input is a 400-class JSON error
(``{"error": {"code", "message", "request_id"}}``) followed by the server
closing the connection: a request smuggled behind a bad one must never be read.
One gateway serves the whole module; it has no '/' route, so unmatched paths
are ``no_route``.
"""

from __future__ import annotations

import json
import socket
import textwrap
import time

import pytest
from conftest import Gateway, raw_exchange

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 0.5
MAX_HEADER_BYTES = 2048
MAX_HEADERS = 20
MAX_URL_BYTES = 512
SMALL_BODY = 100

# A reply to a rejected request must come with the close, long before this.
EXCHANGE_TIMEOUT = 8.0
PROMPT = 3.0


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory):
    config = textwrap.dedent(
        f"""
        [server]
        drain_timeout = 5.0
        header_timeout = {HEADER_TIMEOUT}
        body_timeout = {BODY_TIMEOUT}
        keepalive_timeout = {KEEPALIVE_TIMEOUT}
        max_header_bytes = {MAX_HEADER_BYTES}
        max_headers = {MAX_HEADERS}
        max_url_bytes = {MAX_URL_BYTES}
        [[upstreams]]
        name = "app"
        targets = ["{upstream.addr}"]
        [[routes]]
        name = "echo"
        path = "/echo"
        upstream = "app"
        auth = "none"
        [[routes]]
        name = "small"
        path = "/echo/small"
        upstream = "app"
        auth = "none"
        max_body_bytes = {SMALL_BODY}
        [[routes]]
        name = "readonly"
        path = "/echo/ro"
        upstream = "app"
        auth = "none"
        methods = ["GET", "HEAD"]
        """
    )
    path = tmp_path_factory.mktemp("strict") / "gateway.toml"
    path.write_text(config)
    g = Gateway(path, workers=2)
    try:
        yield g
    finally:
        g.stop()


# -- helpers ----------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """Split raw bytes into complete responses (Content-Length or chunked)."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        head = data[:end].decode("latin-1").split("\r\n")
        rest = data[end + 4 :]
        parts = head[0].split(" ", 2)
        assert parts[0] == "HTTP/1.1", head[0]
        status = int(parts[1])
        headers = []
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        r = Response(status, headers, b"")
        te = r.all("transfer-encoding")
        if status < 200 or status in (204, 304):
            body = b""
        elif te:
            assert te == ["chunked"], te
            body = b""
            while True:
                i = rest.find(b"\r\n")
                if i < 0:
                    return out, data
                size = int(rest[:i], 16)
                if len(rest) < i + 2 + size + 2:
                    return out, data
                body += rest[i + 2 : i + 2 + size]
                rest = rest[i + 2 + size + 2 :]
                if size == 0:
                    break
        else:
            n = int(r.header("content-length") or 0)
            if len(rest) < n:
                return out, data
            body, rest = rest[:n], rest[n:]
        r.body = body
        out.append(r)
        data = rest


def exchange_until_close(port: int, data: bytes) -> tuple[list[Response], float]:
    t0 = time.monotonic()
    raw = raw_exchange(port, data, timeout=EXCHANGE_TIMEOUT)
    elapsed = time.monotonic() - t0
    responses, leftover = parse_responses(raw)
    assert leftover == b"", f"unparsed bytes after the responses: {leftover[:200]!r}"
    return responses, elapsed


def assert_error(r: Response, status: int, code: str) -> None:
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type") == "application/json"
    err = r.json()["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["request_id"] and err["request_id"] == r.header("x-request-id")


def assert_rejected_and_closed(port: int, data: bytes, status: int = 400, code: str = "bad_request") -> Response:
    responses, elapsed = exchange_until_close(port, data)
    assert len(responses) == 1, [(r.status, r.body) for r in responses]
    r = responses[0]
    assert_error(r, status, code)
    assert r.header("connection") == "close"
    assert elapsed < PROMPT, f"the server did not close the connection (took {elapsed:.2f}s)"
    return r


class Client:
    """A raw keep-alive client: send bytes, read whole responses, bounded."""

    def __init__(self, port: int, timeout: float = EXCHANGE_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.deadline = time.monotonic() + timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int = 1) -> list[Response]:
        got: list[Response] = []
        while True:
            rs, self.buf = parse_responses(self.buf)
            got += rs
            if len(got) >= n:
                return got
            assert time.monotonic() < self.deadline, "timed out waiting for a response"
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed after {len(got)} responses"
            self.buf += chunk

    def wait_closed(self, limit: float) -> float:
        """Seconds until the server closes (EOF or reset); fails after `limit`."""
        t0 = time.monotonic()
        self.sock.settimeout(limit)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.buf += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail(f"connection still open after {limit}s")
        return time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(gw):
    made = []

    def make(**kw) -> Client:
        c = Client(gw.port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def get(path: str = "/echo", extra: str = "", host: str = "gw.test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def echo_of(r: Response) -> dict:
    assert r.status == 200, (r.status, r.body)
    return r.json()


def upstream_headers(echo: dict) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


# -- sanity: the module's gateway proxies -------------------------------------------


def test_plain_request_is_proxied(gw, client):
    c = client()
    c.send(get("/echo/hello?x=1"))
    (r,) = c.read()
    e = echo_of(r)
    assert (e["method"], e["path"], e["query"], e["version"]) == ("GET", "/echo/hello", "x=1", "1.1")
    assert r.header("x-upstream") == "yes"
    # keep-alive: a second request on the same connection
    c.send(get("/echo/again"))
    (r2,) = c.read()
    assert echo_of(r2)["path"] == "/echo/again"


# -- malformed input: 400 bad_request, then close ------------------------------------

MALFORMED = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate-cl-same": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "duplicate-cl-differ": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-list": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl-not-a-number": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
    "cl-negative": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello",
    "cl-plus": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "cl-hex": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
    "te-not-chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "chunk-size-not-hex": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk-without-crlf": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "obs-fold-space": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "obs-fold-tab": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",
    "bare-lf-request-line": b"GET /echo HTTP/1.1\nHost: x\r\n\r\n",
    "bare-lf-header": b"GET /echo HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "bare-lf-everywhere": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "bare-cr-header": b"GET /echo HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "bare-cr-in-value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    "tab-before-colon": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A\t: b\r\n\r\n",
    "no-colon": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A b\r\n\r\n",
    "ctl-in-name": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-\x01A: b\r\n\r\n",
    "nul-in-name": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n",
    "ctl-in-value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n",
    "nul-in-value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "del-in-value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: b\x7fc\r\n\r\n",
    "missing-host-1.1": b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two-hosts": b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "two-hosts-same": b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n",
    "target-relative": b"GET echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-bad-escape": b"GET /echo/a%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-nul-escape": b"GET /echo/a%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-space": b"GET /echo/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-ctl": b"GET /echo/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    "target-asterisk-get": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "bad-method": b"G(ET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-version": b"GET /echo HTTX/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_400_then_close(gw, raw):
    assert_rejected_and_closed(gw.port, raw)


def test_smuggled_request_after_cl_te_is_never_answered(gw):
    # The body of the "outer" request hides a second request; nothing but the 400 comes back.
    smuggle = b"GET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(smuggle), smuggle)
    )
    r = assert_rejected_and_closed(gw.port, raw)
    assert b"smuggled" not in r.body


def test_http_1_0_without_host_is_fine(gw):
    responses, _ = exchange_until_close(gw.port, b"GET /echo/old HTTP/1.0\r\n\r\n")
    (r,) = responses
    assert echo_of(r)["path"] == "/echo/old"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
def test_unsupported_version_505(gw, version):
    assert_rejected_and_closed(
        gw.port, b"GET /echo %s\r\nHost: x\r\n\r\n" % version, 505, "http_version_not_supported"
    )


def test_error_after_good_pipelined_request(gw):
    # A good request, then a broken one in the same packet: answered in order, then closed.
    raw = get("/echo/first") + b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + get("/echo/never")
    responses, elapsed = exchange_until_close(gw.port, raw)
    assert [r.status for r in responses] == [200, 400], [(r.status, r.body) for r in responses]
    assert echo_of(responses[0])["path"] == "/echo/first"
    assert_error(responses[1], 400, "bad_request")
    assert elapsed < PROMPT


# -- limits ---------------------------------------------------------------------------


def test_headers_under_limit_pass(gw):
    raw = get(extra="X-Pad: " + "a" * (MAX_HEADER_BYTES // 2) + "\r\nConnection: close\r\n")
    responses, _ = exchange_until_close(gw.port, raw)
    assert echo_of(responses[0])["path"] == "/echo"


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 100, 4 * MAX_HEADER_BYTES])
def test_header_bytes_over_limit_431(gw, size):
    raw = get(extra="X-Pad: " + "a" * size + "\r\n")
    assert_rejected_and_closed(gw.port, raw, 431, "headers_too_large")


def test_header_bytes_over_limit_in_many_small_headers_431(gw):
    extra = "".join(f"X-P{i}: {'b' * 200}\r\n" for i in range(MAX_HEADERS - 5))
    assert len(extra) > MAX_HEADER_BYTES
    assert_rejected_and_closed(gw.port, get(extra=extra), 431, "headers_too_large")


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES * 4, 400 * 1024], ids=["4x-limit", "400KiB"])
def test_unfinished_head_over_limit_431_without_waiting_for_the_end(gw, size):
    # The head never ends: once it is over max_header_bytes the answer is 431 at
    # once, not a header timeout later (and the gateway holds no more than that).
    raw = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * size
    t0 = time.monotonic()
    assert_rejected_and_closed(gw.port, raw, 431, "headers_too_large")
    assert time.monotonic() - t0 < HEADER_TIMEOUT


def test_header_count_under_limit_passes(gw):
    extra = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS - 3)) + "Connection: close\r\n"
    responses, _ = exchange_until_close(gw.port, get(extra=extra))
    assert echo_of(responses[0])["path"] == "/echo"


def test_header_count_over_limit_431(gw):
    extra = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS + 5))
    assert_rejected_and_closed(gw.port, get(extra=extra), 431, "headers_too_large")


def test_url_under_limit_passes(gw):
    path = "/echo/" + "u" * (MAX_URL_BYTES - 50)
    responses, _ = exchange_until_close(gw.port, get(path, extra="Connection: close\r\n"))
    assert echo_of(responses[0])["path"] == path


@pytest.mark.parametrize("where", ["path", "query"])
def test_url_over_limit_414(gw, where):
    long = "u" * (MAX_URL_BYTES + 10)
    path = f"/echo/{long}" if where == "path" else f"/echo?q={long}"
    assert_rejected_and_closed(gw.port, get(path), 414, "uri_too_long")


def test_body_under_route_limit_passes(gw):
    body = b"b" * SMALL_BODY
    raw = b"POST /echo/small HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    responses, _ = exchange_until_close(gw.port, raw)
    assert echo_of(responses[0])["body_bytes"] == SMALL_BODY


def test_body_over_route_limit_content_length_413(gw):
    body = b"b" * (SMALL_BODY + 1)
    raw = b"POST /echo/small HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert_rejected_and_closed(gw.port, raw, 413, "body_too_large")


def test_body_over_limit_with_expect_gets_413_not_100(gw):
    raw = b"POST /echo/small HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    raw_reply = raw_exchange(gw.port, raw, timeout=EXCHANGE_TIMEOUT)
    assert raw_reply.startswith(b"HTTP/1.1 413 "), raw_reply[:200]
    (r,), _ = parse_responses(raw_reply)
    assert_error(r, 413, "body_too_large")


def test_body_over_limit_only_on_the_small_route(gw):
    body = b"b" * (SMALL_BODY * 5)
    raw = b"POST /echo/big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    responses, _ = exchange_until_close(gw.port, raw)
    assert echo_of(responses[0])["body_bytes"] == len(body)


def test_chunked_body_growing_past_limit_413(gw, client):
    c = client()
    c.send(b"POST /echo/small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"20\r\n" + b"a" * 0x20 + b"\r\n")  # under the limit: streamed to the upstream
    time.sleep(0.1)
    c.send(b"20\r\n" + b"a" * 0x20 + b"\r\n")
    time.sleep(0.1)
    c.send(b"40\r\n" + b"a" * 0x40 + b"\r\n")  # now 128 > 100
    (r,) = c.read()
    assert_error(r, 413, "body_too_large")
    assert r.header("connection") == "close"
    assert c.wait_closed(PROMPT) < PROMPT


def test_chunked_body_past_limit_in_one_packet_413(gw):
    raw = b"POST /echo/small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + (
        b"50\r\n" + b"a" * 0x50 + b"\r\n"
    ) * 2 + b"0\r\n\r\n"
    assert_rejected_and_closed(gw.port, raw, 413, "body_too_large")


# -- timeouts -------------------------------------------------------------------------


def _closed_promptly(reply: bytes, elapsed: float, allowed_codes=("request_timeout",)) -> None:
    limit = HEADER_TIMEOUT + 2.0
    assert elapsed < limit, f"connection still open after {elapsed:.2f}s"
    if reply:
        responses, leftover = parse_responses(reply)
        assert leftover == b""
        (r,) = responses
        assert r.status == 408
        assert_error(r, 408, "request_timeout")


def test_slowloris_unfinished_head_is_closed(gw):
    t0 = time.monotonic()
    reply = raw_exchange(gw.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: b", timeout=EXCHANGE_TIMEOUT)
    _closed_promptly(reply, time.monotonic() - t0)


def test_slowloris_trickle_is_closed(gw):
    # One byte every 50 ms: never idle, but the whole head has a deadline.
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=EXCHANGE_TIMEOUT)
    s.settimeout(0.05)
    t0 = time.monotonic()
    reply = b""
    closed = False
    try:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        trickle = b"X-Slow: " + b"a" * 1000
        i = 0
        while time.monotonic() - t0 < EXCHANGE_TIMEOUT:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                reply += chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
            try:
                s.sendall(trickle[i % len(trickle) : i % len(trickle) + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            i += 1
    finally:
        s.close()
    assert closed, "the trickling connection was never closed"
    _closed_promptly(reply, time.monotonic() - t0)


def test_connection_that_sends_nothing_is_closed(gw):
    t0 = time.monotonic()
    reply = raw_exchange(gw.port, b"", timeout=EXCHANGE_TIMEOUT)
    _closed_promptly(reply, time.monotonic() - t0)


def test_idle_keepalive_connection_is_closed(gw, client):
    c = client()
    c.send(get())
    (r,) = c.read()
    assert r.status == 200 and r.header("connection") is None
    waited = c.wait_closed(KEEPALIVE_TIMEOUT + 2.0)
    assert waited >= KEEPALIVE_TIMEOUT * 0.5
    # An idle keep-alive close sends nothing: there was no request to answer.
    assert c.buf == b"", c.buf[:200]


def test_stalled_body_is_closed(gw):
    t0 = time.monotonic()
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
    reply = raw_exchange(gw.port, raw, timeout=EXCHANGE_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < BODY_TIMEOUT + 2.0, f"connection still open after {elapsed:.2f}s"
    if reply:
        responses, _ = parse_responses(reply)
        (r,) = responses
        assert_error(r, 408, "request_timeout")


def test_stalled_chunked_body_is_closed(gw):
    t0 = time.monotonic()
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    reply = raw_exchange(gw.port, raw, timeout=EXCHANGE_TIMEOUT)
    elapsed = time.monotonic() - t0
    assert elapsed < BODY_TIMEOUT + 2.0, f"connection still open after {elapsed:.2f}s"
    if reply:
        responses, _ = parse_responses(reply)
        (r,) = responses
        assert_error(r, 408, "request_timeout")


def test_slow_but_steady_body_is_not_cut(gw, client):
    # The whole body takes longer than body_timeout, but it keeps up
    # min_body_rate (default 1k/s) in every body_timeout window.
    c = client()
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
    for _ in range(5):
        time.sleep(BODY_TIMEOUT / 2.5)
        c.send(b"a" * 400)
    (r,) = c.read()
    assert echo_of(r)["body_bytes"] == 2000


def test_trickling_body_is_answered_408_within_one_window(gw):
    # A byte every 100 ms never leaves a gap of body_timeout, but it is far
    # below min_body_rate: 408 at the end of the first window, then closed.
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=EXCHANGE_TIMEOUT)
    s.settimeout(0.1)
    t0 = time.monotonic()
    reply = b""
    try:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        while time.monotonic() - t0 < EXCHANGE_TIMEOUT:
            try:
                s.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            except socket.timeout:
                pass
            except ConnectionResetError:
                break
    finally:
        s.close()
    elapsed = time.monotonic() - t0
    assert elapsed < BODY_TIMEOUT + 2.0, f"connection still open after {elapsed:.2f}s"
    (r,) = parse_responses(reply)[0]
    assert_error(r, 408, "request_timeout")


# -- header hygiene -------------------------------------------------------------------

REQUEST_HOP_HEADERS = (
    "Connection: keep-alive, X-Custom-Hop, X-Other-Hop\r\n"
    "Keep-Alive: timeout=5\r\n"
    "TE: trailers\r\n"
    "Trailer: X-Checksum\r\n"
    "Upgrade: h2c-not-really\r\n"
    "Proxy-Connection: keep-alive\r\n"
    "X-Custom-Hop: secret\r\n"
    "X-Other-Hop: secret\r\n"
    "X-End-To-End: kept\r\n"
)


def test_request_hop_by_hop_headers_not_forwarded(gw, client):
    c = client()
    c.send(get(extra=REQUEST_HOP_HEADERS))
    (r,) = c.read()
    seen = upstream_headers(echo_of(r))
    for name in ("keep-alive", "te", "trailer", "upgrade", "proxy-connection", "x-custom-hop", "x-other-hop"):
        assert name not in seen, f"{name} reached the upstream: {seen[name]}"
    # Connection to the upstream is the gateway's own business: never the client's tokens.
    for value in seen.get("connection", []):
        assert "x-custom-hop" not in value.lower()
        assert "upgrade" not in value.lower()
    assert seen["x-end-to-end"] == ["kept"]


def test_connection_named_header_is_case_insensitive(gw, client):
    c = client()
    c.send(get(extra="Connection: X-MiXeD\r\nx-mixed: secret\r\n"))
    (r,) = c.read()
    assert "x-mixed" not in upstream_headers(echo_of(r))


def test_response_hop_by_hop_headers_not_forwarded(gw, client):
    c = client()
    c.send(get())
    (r,) = c.read()
    assert r.status == 200
    assert r.header("x-upstream") == "yes"
    assert r.all("x-hop") == []
    assert r.all("keep-alive") == []
    for value in r.all("connection"):
        assert "x-hop" not in value.lower()
    # and the connection is still usable
    c.send(get("/echo/2"))
    (r2,) = c.read()
    assert echo_of(r2)["path"] == "/echo/2"


def test_forwarding_headers_and_request_id(gw, client):
    c = client()
    c.send(get(host="Shop.Example:8443"))
    (r,) = c.read()
    seen = upstream_headers(echo_of(r))
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["Shop.Example:8443"]
    rid = r.header("x-request-id")
    assert rid
    assert seen["x-request-id"] == [rid]
    # Host for the upstream is its own address (preserve_host = false).
    assert len(seen["host"]) == 1 and seen["host"][0] != "Shop.Example:8443"


def test_request_ids_are_unique(gw, client):
    ids = set()
    for _ in range(3):
        c = client()
        for _ in range(3):
            c.send(get())
            (r,) = c.read()
            ids.add(r.header("x-request-id"))
    assert len(ids) == 9


def test_spoofed_forwarded_headers_from_untrusted_client_replaced(gw, client):
    c = client()
    c.send(get(extra=(
        "X-Forwarded-For: 203.0.113.9\r\n"
        "X-Forwarded-For: 198.51.100.7\r\n"
        "X-Forwarded-Proto: https\r\n"
        "X-Forwarded-Host: evil.example\r\n"
        "X-Request-Id: spoofed-id\r\n"
    )))
    (r,) = c.read()
    seen = upstream_headers(echo_of(r))
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["gw.test"]
    assert seen["x-request-id"] != ["spoofed-id"]
    assert seen["x-request-id"] == [r.header("x-request-id")]


# -- routing errors -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nothing", "/echoX", "/other/echo"])
def test_no_route_404(gw, client, path):
    c = client()
    c.send(get(path))
    (r,) = c.read()
    assert_error(r, 404, "no_route")
    # a local reply does not cost the client its connection
    c.send(get())
    (r2,) = c.read()
    assert echo_of(r2)["path"] == "/echo"


def test_path_normalised_before_routing(gw, client):
    c = client()
    c.send(get("/echo/ro/..%2F..%2Fnothing"))
    (r,) = c.read()
    assert_error(r, 404, "no_route")
    c.send(get("/nothing/../echo/./x//y"))
    (r2,) = c.read()
    assert echo_of(r2)["path"] == "/echo/x/y"


def test_method_not_allowed_405_with_allow(gw, client):
    c = client()
    c.send(b"DELETE /echo/ro/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    (r,) = c.read()
    assert_error(r, 405, "method_not_allowed")
    assert r.header("allow") == "GET, HEAD"
    c.send(get("/echo/ro/1"))
    (r2,) = c.read()
    assert echo_of(r2)["path"] == "/echo/ro/1"


def test_method_not_allowed_body_never_parsed_as_a_request(gw):
    raw = b"POST /echo/ro HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + get("/echo/after")
    responses, _ = exchange_until_close(gw.port, raw)
    # Either the body is skipped and the next request served, or the connection is closed;
    # never is the body parsed as a request.
    assert responses[0].status == 405
    assert responses[0].header("allow") == "GET, HEAD"
    for r in responses[1:]:
        assert echo_of(r)["path"] == "/echo/after"


def test_absolute_form_target(gw, client):
    c = client()
    c.send(b"GET http://api.example:8080/echo/abs?q=1 HTTP/1.1\r\nHost: api.example:8080\r\n\r\n")
    (r,) = c.read()
    e = echo_of(r)
    assert (e["path"], e["query"]) == ("/echo/abs", "q=1")
    assert upstream_headers(e)["x-forwarded-host"] == ["api.example:8080"]


def test_absolute_form_target_is_normalised(gw, client):
    c = client()
    c.send(b"GET http://api.example/echo/ro/../../nothing HTTP/1.1\r\nHost: api.example\r\n\r\n")
    (r,) = c.read()
    assert_error(r, 404, "no_route")
