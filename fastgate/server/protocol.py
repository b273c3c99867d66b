"""HOT PATH. The client side: one asyncio Protocol per client connection.

httptools parses; this class turns each request into an ``Exchange``, runs the
decision pipeline, and streams the request to an ``UpstreamConn`` and the
response back, with backpressure both ways (never buffering a body whole).

Pipelined requests are queued in arrival order and answered in that order; at
most one exchange per connection talks to an upstream at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from ..upstream.client import FRAME_CHUNKED, FRAME_CLOSE, FRAME_LENGTH, FRAME_NONE, UpstreamConn
from ..errors import ERROR_STATUS
from ..ipfilter import pack_ip
from .http1 import HOP_BY_HOP, error_reply, normalise_path, status_line

log = logging.getLogger("fastgate.worker")

# Request headers the gateway reads or rewrites itself (lower-case).
H_HOST = b"host"
H_CONNECTION = b"connection"
H_CONTENT_LENGTH = b"content-length"
H_TRANSFER_ENCODING = b"transfer-encoding"
H_EXPECT = b"expect"
H_UPGRADE = b"upgrade"
H_XFF = b"x-forwarded-for"
H_XFP = b"x-forwarded-proto"
H_XFH = b"x-forwarded-host"
H_RID = b"x-request-id"
H_AUTHORIZATION = b"authorization"

# Not forwarded as received: hop-by-hop, framing we redo, headers we set.
_REQ_MANAGED = HOP_BY_HOP | {H_HOST, H_CONTENT_LENGTH, H_EXPECT, H_XFF, H_XFP, H_XFH, H_RID}

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Backpressure: pause the peer's reading when a transport holds this much.
WRITE_HIGH = 256 * 1024
# Bytes httptools may buffer for one unfinished head before we refuse it
# (precise limits are checked on whole url/header pieces in the callbacks).
_HEAD_SLACK = 256 * 1024
# Lingering close: discard input for at most this long, or until quiet this long.
LINGER_TOTAL = 5.0
LINGER_QUIET = 0.5


class Reject(Exception):
    """Raised inside an httptools callback to stop parsing with a reply."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message


class Exchange:
    """One request/response. Lives from the request head to the response end."""

    __slots__ = (
        "conn",
        "method",
        "path",
        "query",
        "version",
        "keep_alive",
        "request_id",
        "route",
        "host",
        "headers",
        "chunked",
        "length",
        "expect",
        "upgrade",
        "xff",
        "body_buf",
        "body_done",
        "body_seen",
        "up",
        "up_head",
        "resp_started",
        "resp_frame",
        "retried",
        "status",
        "done",
        "tunnel_buf",
        "identity",
        "resp_extra",
        "t0",
        "t_head",
        "bytes_out",
        "decision",
        "error",
        "key",
        "client",
        "target",
        "key_index",
    )

    def __init__(self, conn):
        self.conn = conn
        self.route = None
        self.body_buf = None
        self.body_done = False
        self.body_seen = 0
        self.up = None
        self.up_head = None
        self.resp_started = False
        self.resp_frame = FRAME_NONE
        self.retried = False
        self.status = 0
        self.done = False
        self.tunnel_buf = None
        self.identity = None
        self.resp_extra = b""
        self.t0 = conn.w.now_precise()
        self.t_head = 0.0
        self.bytes_out = 0
        self.decision = None  # the stage that answered locally, for the log
        self.error = None
        self.key = None  # (key_id, owner, plan) once a key is accepted
        self.client = None
        self.target = None
        self.key_index = -1


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "w",
        "transport",
        "parser",
        "peer",
        "closed",
        "url",
        "headers",
        "head_bytes",
        "head_raw",
        "in_head",
        "parsing",
        "active",
        "queue",
        "deadline",
        "deadline_kind",
        "upgraded",
        "write_paused",
        "trusted",
        "pending_reject",
        "out",
        "discarding",
        "linger_end",
        "peer_packed",
    )

    def __init__(self, worker):
        self.w = worker
        self.transport = None
        self.parser = None
        self.peer = "0.0.0.0"
        self.closed = False
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.head_raw = 0
        self.in_head = True
        self.parsing = None
        self.active = None
        self.queue = None
        self.deadline = 0.0
        self.deadline_kind = 0
        self.upgraded = None
        self.write_paused = False
        self.trusted = False
        self.pending_reject = None
        # While an upstream read is being parsed, writes to this client are
        # collected here and flushed as one writev (head + body in one syscall).
        self.out = None
        self.discarding = False
        self.linger_end = 0.0
        self.peer_packed = b""

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self.peer_packed = pack_ip(self.peer)
        w = self.w
        self.trusted = w.is_trusted(self.peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.parser = HttpRequestParser(self)
        w.conns.add(self)
        self.deadline = w.now + w.s.header_timeout
        self.deadline_kind = 1

    def data_received(self, data):
        if self.upgraded is not None:
            self.upgraded.transport.write(data)
            return
        if self.discarding:
            self.deadline = min(self.w.now + LINGER_QUIET, self.linger_end)
            return
        ex = self.active
        if ex is not None and ex.tunnel_buf is not None:
            ex.tunnel_buf.append(data)
            return
        if self.in_head:
            # The precise limits are checked on whole pieces in on_url/on_header;
            # this bounds what httptools buffers for a line that never ends. A
            # chunk holding the end of the head may also hold body bytes, so it
            # is only judged by the hard cap.
            self.head_raw = n = self.head_raw + len(data)
            s = self.w.s
            if self.deadline_kind == 3:
                # An idle keep-alive connection starts a new request head.
                self.deadline = self.w.now + s.header_timeout
                self.deadline_kind = 1
            if n > s.max_header_bytes + s.max_url_bytes and (
                n > s.max_header_bytes + _HEAD_SLACK or (b"\r\n\r\n" not in data and data[:1] != b"\n")
            ):
                self.reject_now("headers_too_large", "request head exceeds the size limit")
                return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            ex = self.parsing_or_last()
            if ex is not None and ex.upgrade is not None:
                ex.tunnel_buf = [data[exc.args[0]:]]
            else:
                self.reject_now("bad_request", "unexpected upgrade")
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self.reject_now(cause.code, cause.message)
            else:
                log.exception("bug while parsing a request", exc_info=cause)
                self.reject_now("internal_error", "internal error")
        except HttpParserError as exc:
            if str(exc) == "Invalid HTTP version":
                self.reject_now("http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported")
            else:
                self.reject_now("bad_request", f"malformed request: {exc}")

    def parsing_or_last(self):
        if self.queue:
            return self.queue[-1]
        return self.active

    def connection_lost(self, exc):
        self.closed = True
        self.w.conns.discard(self)
        if self.upgraded is not None:
            self.upgraded.transport.close()
            return
        ex = self.active
        self.active = None
        self.queue = None
        if ex is not None and ex.up is not None:
            up = ex.up
            ex.up = None
            up.ex = None
            up.transport.abort()

    def pause_writing(self):
        self.write_paused = True
        if self.upgraded is not None:
            self.upgraded.transport.pause_reading()
            return
        ex = self.active
        if ex is not None and ex.up is not None:
            ex.up.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.upgraded is not None:
            self.upgraded.transport.resume_reading()
            return
        ex = self.active
        if ex is not None and ex.up is not None and not ex.up.closed:
            ex.up.transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------
    def on_url(self, url):
        self.url += url
        if len(self.url) > self.w.s.max_url_bytes:
            raise Reject("uri_too_long", "request target exceeds the URL length limit")

    def on_header(self, name, value):
        self.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        s = self.w.s
        if self.head_bytes > s.max_header_bytes:
            raise Reject("headers_too_large", "request headers exceed the size limit")
        if len(self.headers) > s.max_headers:
            raise Reject("headers_too_large", "too many request headers")

    def on_headers_complete(self):
        self.in_head = False
        self.head_raw = 0
        if self.closed or self.pending_reject is not None:
            return
        url = self.url
        headers = self.headers
        # Reset for the next message here: httptools then needs no on_message_begin.
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Reject("http_version_not_supported", f"HTTP/{version} is not supported")
        ex = Exchange(self)
        ex.version = version
        ex.method = parser.get_method()
        ex.keep_alive = parser.should_keep_alive()
        ex.request_id = self.w.next_request_id()
        host = None
        length = None
        chunked = False
        expect = None
        upgrade = None
        xff = None
        rid_in = None
        conn_tokens = None
        fwd = []
        for name, value in headers:
            ln = name.lower()
            if ln in _REQ_MANAGED:
                if ln == H_HOST:
                    if host is not None:
                        raise Reject("bad_request", "more than one Host header")
                    host = value
                elif ln == H_CONTENT_LENGTH:
                    length = int(value)
                elif ln == H_TRANSFER_ENCODING:
                    chunked = True
                elif ln == H_EXPECT:
                    expect = value.lower()
                elif ln == H_UPGRADE:
                    upgrade = value
                elif ln == H_CONNECTION:
                    conn_tokens = value.lower()
                elif ln == H_XFF:
                    xff = value if xff is None else xff + b", " + value
                elif ln == H_RID:
                    rid_in = value
                continue
            if ln[:11] == b"x-fastgate-":
                continue  # identity headers are ours to set: never forwarded from a client
            fwd.append((ln, name, value))
        if host is None and version == "1.1":
            raise Reject("bad_request", "HTTP/1.1 request without a Host header")
        if conn_tokens is not None:
            drop = {t.strip() for t in conn_tokens.split(b",")}
            drop.discard(b"close")
            drop.discard(b"keep-alive")
            drop.discard(b"upgrade")
            if drop:
                fwd = [h for h in fwd if h[0] not in drop]
        if upgrade is not None and not parser.should_upgrade():
            upgrade = None
        if url[:1] == b"/":
            q = url.find(b"?")
            if q < 0:
                raw_path, ex.query = url, b""
            else:
                raw_path, ex.query = url[:q], url[q:]
        else:
            try:
                u = parse_url(url)
            except Exception:
                raise Reject("bad_request", "request target is not a path or an absolute URL") from None
            if not u.path:
                raise Reject("bad_request", "request target is not a path or an absolute URL")
            raw_path = u.path
            ex.query = b"?" + u.query if u.query else b""
            if u.host:
                # Absolute form: its authority replaces Host (RFC 9112 §3.2.2).
                host = u.host + b":%d" % u.port if u.port else u.host
        path = normalise_path(raw_path)
        if path is None:
            raise Reject("bad_request", "invalid request path")
        ex.path = path
        ex.host = host
        ex.headers = fwd
        ex.length = length
        ex.chunked = chunked
        ex.expect = expect
        ex.upgrade = upgrade
        ex.xff = xff
        if rid_in is not None and self.trusted and 0 < len(rid_in) <= 200:
            ex.request_id = rid_in.decode("latin-1")
        if length is None and not chunked:
            ex.body_done = True
        self.parsing = ex
        if self.active is None:
            self.active = ex
            self.deadline_kind = 2 if not ex.body_done else 0
            self.deadline = self.w.now + self.w.s.body_timeout
            self.w.handle(ex)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            if len(self.queue) > 64:
                self.transport.pause_reading()

    def on_body(self, body):
        ex = self.parsing
        if ex is None:
            return
        w = self.w
        self.deadline = w.now + w.s.body_timeout
        ex.body_seen += len(body)
        route = ex.route
        if route is not None and ex.body_seen > route.max_body:
            self.body_too_large(ex)
            return
        up = ex.up
        if up is not None and ex.up_head is None:
            up.deadline = w.now + up.target.read_timeout
            if ex.chunked:
                up.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                up.transport.write(body)
        elif not ex.done:
            if ex.body_buf is None:
                ex.body_buf = []
            ex.body_buf.append(body)
            if ex.body_seen > WRITE_HIGH and ex.up is None:
                # Waiting for an upstream connection: bound what we hold.
                self.transport.pause_reading()

    def on_message_complete(self):
        self.in_head = True
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.body_done = True
        if self.active is ex and self.deadline_kind == 2:
            self.deadline_kind = 0
        up = ex.up
        if ex.chunked and up is not None and ex.up_head is None and not ex.done:
            up.transport.write(b"0\r\n\r\n")

    # -- replies ------------------------------------------------------------
    def reject_now(self, code: str, message: str) -> None:
        """Input we cannot parse or accept: answer it in order, then close."""
        if self.closed:
            return
        ex = self.active
        broken = self.parsing
        self.parsing = None
        if ex is None:
            rid = self.w.next_request_id()
            self.write(error_reply(code, message, rid, close=True))
            self.w.count_status(ERROR_STATUS[code])
            if self.w.access is not None:
                self.w.log_refused(self, rid, code)
            self.close(linger=True)
        elif broken is ex:
            # The active request's own body is malformed or too slow.
            ex.body_done = False
            self.upstream_failed(ex, code, message)
        else:
            # Earlier requests are still being answered: stop reading, answer
            # them, then send this error and close (see finish()).
            if broken is not None and self.queue and self.queue[-1] is broken:
                self.queue.pop()
            self.pending_reject = (code, message)
            self.transport.pause_reading()

    def write(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.transport.write(data)
        else:
            out.append(data)

    def flush(self) -> None:
        """Hand what a batch produced to the transport in one writev."""
        out = self.out
        self.out = None
        if out:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def close(self, linger: bool = False) -> None:
        """Close after what was written. With linger, the client may still be
        sending (a body we refused, a head we rejected): closing at once would
        make the kernel answer its data with RST, which can destroy our reply
        before the client reads it. So: half-close, discard input until the
        client closes or goes quiet (nginx's lingering close), then close."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.transport.resume_reading()
            self.upgraded = None
            self.discarding = True
            w = self.w
            self.linger_end = w.now + LINGER_TOTAL
            self.deadline = w.now + LINGER_QUIET
            self.deadline_kind = 4
            return
        self.transport.close()

    def abort(self) -> None:
        self.out = None
        self.closed = True
        self.transport.abort()

    def local_reply(self, ex: Exchange, code: str, message: str, extra: bytes = b"") -> None:
        """Answer an exchange ourselves (a denial or an upstream failure)."""
        close = not ex.keep_alive or not ex.body_done or self.w.draining or ex.upgrade is not None
        ex.resp_started = True
        ex.status = ERROR_STATUS[code]
        ex.error = code
        self.write(
            error_reply(code, message, ex.request_id, close=close, extra=extra, head_only=ex.method == b"HEAD")
        )
        self.finish(ex, close)

    def body_too_large(self, ex: Exchange) -> None:
        ex.done = True
        if ex.up is not None:
            up = ex.up
            ex.up = None
            up.ex = None
            up.transport.abort()
        if not ex.resp_started and self.active is ex:
            ex.body_done = False
            self.local_reply(ex, "body_too_large", f"request body exceeds {ex.route.max_body} bytes")
        else:
            self.abort()

    # -- upstream side, called by UpstreamConn and the worker --------------
    def send_upstream(self, ex: Exchange, up: UpstreamConn, head: bytes) -> None:
        """Write the head, whatever body arrived already, and then stream."""
        w = self.w
        if ex.expect == b"100-continue" and not ex.body_done and ex.version == "1.1":
            self.write(CONTINUE_100)
        parts = [head]
        buf = ex.body_buf
        if buf:
            ex.body_buf = None
            if ex.chunked:
                for b in buf:
                    parts += (b"%x\r\n" % len(b), b, b"\r\n")
            else:
                parts += buf
            if not self.closed:
                self.transport.resume_reading()
        if ex.chunked and ex.body_done:
            parts.append(b"0\r\n\r\n")
        ex.up_head = None
        up.start(ex, b"".join(parts) if len(parts) > 1 else head, w.now)
        if self.write_paused:
            up.transport.pause_reading()

    def response_head(self, ex: Exchange, status: int, headers, length, chunked, up) -> None:
        if ex is not self.active or self.closed:
            return
        ex.status = status
        ex.resp_started = True
        ex.t_head = self.w.loop.time()
        head_only = ex.method == b"HEAD" or status == 204 or status == 304 or status == 101
        close = not ex.keep_alive or self.w.draining or (ex.upgrade is not None and status != 101)
        if status == 101:
            close = False
        if head_only:
            frame = FRAME_NONE
        elif length is not None and not chunked:
            frame = FRAME_LENGTH
        elif ex.version == "1.1":
            frame = FRAME_CHUNKED
        else:
            frame = FRAME_CLOSE
            close = True
        ex.resp_frame = frame
        parts = [status_line(status)]
        for _, name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if length is not None and (frame == FRAME_LENGTH or head_only):
            parts += (b"content-length: ", length, b"\r\n")
        elif frame == FRAME_CHUNKED:
            parts.append(b"transfer-encoding: chunked\r\n")
        if close:
            parts.append(b"connection: close\r\n")
        elif ex.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        if ex.resp_extra:
            parts.append(ex.resp_extra)
        parts += (b"x-request-id: ", ex.request_id.encode(), b"\r\n\r\n")
        self.write(b"".join(parts))
        if close:
            ex.keep_alive = False
        if ex.method == b"HEAD" and status != 101:
            # llhttp cannot be told that a HEAD response has no body: finish
            # here, and do not pool the connection: some upstreams send a body
            # to HEAD anyway, which would be read as the next response.
            up.resp_done = True
            self.response_complete(ex, up, False)

    def response_body(self, ex: Exchange, body: bytes) -> None:
        if ex is not self.active or self.closed:
            return
        ex.bytes_out += len(body)
        if ex.resp_frame == FRAME_CHUNKED:
            self.write(b"%x\r\n" % len(body))
            self.write(body)
            self.write(b"\r\n")
        else:
            self.write(body)

    def response_complete(self, ex: Exchange, up: UpstreamConn, reusable: bool) -> None:
        if ex.done:
            return
        ex.done = True
        if ex.up is up:
            ex.up = None
        up.ex = None
        if reusable and ex.body_done and not up.closed and ex.upgrade is None:
            up.reused = True
            up.target.put(up, self.w.now)
        elif not up.closed:
            up.transport.close()
        if ex is not self.active or self.closed:
            return
        if ex.resp_frame == FRAME_CHUNKED:
            self.write(b"0\r\n\r\n")
        self.finish(ex, not ex.keep_alive or not ex.body_done or ex.resp_frame == FRAME_CLOSE)

    def finish(self, ex: Exchange, close: bool) -> None:
        ex.done = True
        self.active = None
        w = self.w
        w.account(ex)
        if w.access is not None:
            w.log_exchange(ex)
        q = self.queue
        if close or (self.w.draining or self.pending_reject) and not q:
            if self.pending_reject is not None and not close:
                code, message = self.pending_reject
                self.write(error_reply(code, message, self.w.next_request_id(), close=True))
                self.w.count_status(ERROR_STATUS[code])
            self.close(linger=self.pending_reject is not None or not ex.body_done or self.parsing is not None)
            return
        if q:
            nxt = q.popleft()
            if len(q) < 32:
                self.transport.resume_reading()
            self.active = nxt
            self.w.handle(nxt)
        elif self.parsing is None:
            w = self.w
            if self.head_raw:  # the next head has started arriving
                self.deadline = w.now + w.s.header_timeout
                self.deadline_kind = 1
            else:
                self.deadline = w.now + w.s.keepalive_timeout
                self.deadline_kind = 3

    def upstream_failed(self, ex: Exchange, code: str, message: str) -> None:
        up = ex.up
        if up is not None:
            ex.up = None
            up.ex = None
            if not up.closed:
                up.transport.abort()
        if ex.done or ex is not self.active or self.closed:
            return
        if ex.resp_started:
            # Never let a cut-off response look complete to the client.
            ex.done = True
            self.abort()
            return
        self.local_reply(ex, code, message)

    def upstream_lost(self, ex: Exchange, up: UpstreamConn) -> None:
        if ex.up is up:
            ex.up = None
        if ex.done or ex is not self.active or self.closed:
            return
        if (
            up.reused
            and not up.got_bytes
            and not ex.retried
            and ex.method in IDEMPOTENT
            and ex.length in (None, 0)
            and not ex.chunked
        ):
            # A pooled connection the upstream had already closed: one retry
            # on a fresh connection, only when nothing can have been acted on twice.
            ex.retried = True
            self.w.connect(ex, up.target)
            return
        self.upstream_failed(ex, "upstream_unavailable", "upstream closed the connection")

    def upstream_upgraded(self, up: UpstreamConn, rest: bytes) -> bool:
        """The upstream answered 101: from now on both sides are a byte pipe."""
        ex = self.active
        if ex is None or ex.up is not up or self.closed:
            return False
        self.upgraded = up
        up.tunnel = self
        ex.done = True
        if rest:
            self.write(rest)
        for chunk in ex.tunnel_buf or ():
            if chunk:
                up.transport.write(chunk)
        ex.tunnel_buf = None
        self.deadline_kind = 0
        self.w.count_status(101)
        return True

    # -- timeouts (called by the worker's sweep) ----------------------------
    def on_timeout(self) -> None:
        kind = self.deadline_kind
        self.deadline_kind = 0
        if kind == 1:
            self.reject_now("request_timeout", "request head not received in time")
        elif kind == 2:
            ex = self.active
            if ex is not None and not ex.resp_started:
                ex.body_done = False
                self.upstream_failed(ex, "request_timeout", "request body not received in time")
            else:
                self.abort()
        elif kind == 3:
            self.close()
        elif kind == 4:
            self.transport.close()
