"""HOT PATH. The client side: one asyncio Protocol per client connection.

fastgate._http parses each read whole into a batch of events; this class turns
each request into an ``Exchange``, runs the decision pipeline, and streams the
request to an ``UpstreamConn`` and the response back, with backpressure both
ways.

What reaches an upstream, and when:
- Nothing of a request the parser refuses. A read is parsed whole before any
  event is acted on, so a head whose own read also holds a framing error is
  never dispatched.
- A body up to ``request_buffer`` is read and validated whole before the
  upstream is even chosen (nginx's ``proxy_request_buffering``); a chunked one
  then goes upstream with a Content-Length. A larger body streams (re-chunked
  by us when chunked); a framing error found later resets the upstream
  connection (SO_LINGER 0), so it can never take the body for complete, and
  that connection is never pooled.
- Bytes after the head of a WebSocket upgrade are held until the 101.

Pipelined requests are queued in arrival order and answered in that order; at
most one exchange per connection talks to an upstream at a time.

Timers (one deadline per connection, swept by the worker): a connection that
never sent a byte of a request, or an idle keep-alive one, is closed silently;
a head that does not complete in ``header_timeout`` gets 408; a body must
arrive at ``min_body_rate`` on average over each ``body_timeout`` window
(a trickle gets 408 within one window).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import deque

from .._http import EV_BODY, EV_END, EV_ERROR, EV_HEAD, EV_UPGRADE, RequestParser
from ..errors import ERROR_STATUS
from ..ipfilter import pack_ip
from ..upstream.client import FRAME_CHUNKED, FRAME_CLOSE, FRAME_LENGTH, FRAME_NONE, UpstreamConn
from .http1 import error_reply, normalise_path, status_line

log = logging.getLogger("fastgate.worker")

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Backpressure: pause the peer's reading when a transport holds this much.
WRITE_HIGH = 256 * 1024
# Lingering close: discard input for at most this long, or until quiet this long.
LINGER_TOTAL = 5.0
LINGER_QUIET = 0.5

# What the connection's one deadline is for.
K_NONE = 0  # no timer (an exchange is with the upstream, which has its own)
K_HEAD = 1  # a head is arriving (or nothing yet on a fresh connection)
K_BODY = 2  # a body is arriving: a min_body_rate window
K_IDLE = 3  # idle keep-alive
K_LINGER = 4  # lingering close

_RST = struct.pack("ii", 1, 0)
now_ns = time.perf_counter_ns  # latencies: a monotonic clock with µs resolution


def reset(transport) -> None:
    """Abort with a TCP RST (SO_LINGER 0): the peer sees a reset, never an
    orderly end it could take for the end of a message."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
    transport.abort()


class Exchange:
    """One request/response. Lives from the request head to the response end."""

    __slots__ = (
        "conn",
        "head",
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
        "streaming",
        "waiting",
        "continued",
        "up_chunked",
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
        "error",
        "key",
        "client",
        "target",
        "key_index",
        "authz_method",
        "verdict",
        "rate",
        "policy",
        "up_path",
    )

    def __init__(self, conn, h, path: bytes, request_id: str):
        self.conn = conn
        self.head = h
        self.method = h.method
        self.path = path
        self.query = h.query
        self.version = "1.1" if h.version == 11 else "1.0"
        self.keep_alive = h.keep_alive
        self.request_id = request_id
        self.route = None
        self.host = h.host
        headers = h.headers
        tokens = h.conn_tokens
        if tokens:  # fields named in Connection are hop-by-hop too
            drop = set(tokens)
            headers = [f for f in headers if f[0] not in drop]
        self.headers = headers
        self.chunked = h.chunked
        self.length = h.length if h.length >= 0 else None
        self.expect = h.expect_continue and h.version == 11
        self.upgrade = h.upgrade
        self.xff = h.xff
        self.body_buf = None
        self.body_done = not (h.chunked or h.length > 0)
        self.body_seen = 0
        self.streaming = False  # the body goes upstream as it arrives
        self.waiting = False  # admitted; waits for its whole body before the upstream
        self.continued = False  # 100 Continue sent
        self.up_chunked = False  # the upstream gets chunked framing from us
        self.up = None
        self.up_head = None  # the pending connect, while there is one
        self.resp_started = False
        self.resp_frame = FRAME_NONE
        self.retried = False
        self.status = 0
        self.done = False
        self.tunnel_buf = [] if h.upgrade is not None else None
        self.identity = None
        self.resp_extra = b""
        self.t0 = now_ns()
        self.t_head = 0
        self.bytes_out = 0
        self.error = None  # the error code of a local reply, or how the exchange broke
        self.key = None  # (key_id, owner, plan) once a key is accepted
        self.client = None
        self.target = None
        self.key_index = -1
        self.authz_method = h.method  # what routes and scopes check (a route may honour method override)
        self.verdict = 0  # the core's answer for the key
        self.rate = 0
        self.policy = b""
        self.up_path = None  # the path the upstream gets, when a rewrite changed it


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "w",
        "transport",
        "parser",
        "peer",
        "closed",
        "active",
        "parsing",
        "tunnel_ex",
        "queue",
        "deadline",
        "deadline_kind",
        "body_bytes",
        "idle_since",
        "upgraded",
        "write_paused",
        "read_paused",
        "trusted",
        "pending_reject",
        "out",
        "discarding",
        "linger_end",
        "peer_packed",
        "doomed",
    )

    def __init__(self, worker):
        self.w = worker
        self.transport = None
        self.parser = None
        self.peer = "0.0.0.0"
        self.closed = False
        self.active = None  # the exchange being answered
        self.parsing = None  # the exchange whose body the parser is in
        self.tunnel_ex = None  # an upgrade exchange holding bytes for its tunnel
        self.queue = None
        self.deadline = 0.0
        self.deadline_kind = K_NONE
        self.body_bytes = 0  # body bytes received in the current rate window
        self.idle_since = 0.0
        self.upgraded = None
        self.write_paused = False
        self.read_paused = 0  # bit 1: upstream backpressure, 2: pipelining queue, 4: held body
        self.trusted = False
        self.pending_reject = None
        # While an upstream read is being parsed, writes to this client are
        # collected here and flushed as one writev (head + body in one syscall).
        self.out = None
        self.discarding = False
        self.linger_end = 0.0
        self.peer_packed = b""
        self.doomed = 0  # while a batch is handled: the seq of the message its error refuses

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        w = self.w
        if len(w.conns) >= w.max_connections and not w.shed_idle():
            # At the cap with nothing idle to close: refuse, counted and logged.
            self.closed = True
            w.refuse_connection(transport)
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self.peer_packed = pack_ip(self.peer)
        self.trusted = w.is_trusted(self.peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        s = w.s
        self.parser = RequestParser(
            max_url=s.max_url_bytes, max_head=s.max_header_bytes, max_fields=s.max_headers,
            max_trailers=min(s.max_headers, 64), max_trailer_bytes=min(s.max_header_bytes, 8192),
            key_header=w.key_header, trusted=self.trusted, underscores=s.underscores_in_headers,
        )
        w.conns.add(self)
        # A connection that never sends a byte is closed, silently, after this.
        self.idle_since = w.loop.time()
        self.deadline = w.now + s.header_timeout
        self.deadline_kind = K_HEAD

    def data_received(self, data):
        if self.upgraded is not None:
            self.upgraded.transport.write(data)
            return
        if self.discarding:
            self.deadline = min(self.w.now + LINGER_QUIET, self.linger_end)
            return
        if self.closed:
            return
        events = self.parser.feed(data)
        try:
            if events:
                self.on_events(events)
            if not self.closed:
                self.arm()
        except Exception:
            # A bug, never bad input (that is a 4xx): answer 500 if we still
            # can, and close, rather than leave the client hanging.
            log.exception("bug while handling a request from %s", self.peer)
            self.internal_error()

    def internal_error(self) -> None:
        ex = self.active
        if self.closed:
            return
        if ex is not None and not ex.resp_started:
            self.parsing = None
            ex.keep_alive = False
            try:
                self.local_reply(ex, "internal_error", "internal error")
                return
            except Exception:
                log.exception("bug while answering 500")
        self.abort()

    def on_events(self, events: list) -> None:
        n = len(events)
        # The parser stops at an error, so it is last; the head it belongs to (if
        # it came in this same read) is never dispatched.
        doomed = self.doomed = events[n - 1][2] if events[n - 2] == EV_ERROR else 0
        i = 0
        while i < n:
            kind = events[i]
            value = events[i + 1]
            i += 2
            if kind == EV_BODY:
                self.on_body(value)
            elif kind == EV_HEAD:
                if value.seq != doomed:
                    self.on_head(value)
            elif kind == EV_END:
                self.on_end()
            elif kind == EV_UPGRADE:
                self.hold_for_tunnel(value)
            else:
                self.reject_now(value[0], value[1])
            if self.closed:
                break
        self.doomed = 0

    def connection_lost(self, exc):
        was_closed = self.closed
        self.closed = True
        w = self.w
        w.conns.discard(self)
        if self.upgraded is not None:
            self.upgraded.transport.close()
            return
        ex = self.active
        self.active = None
        self.queue = None
        if ex is None:
            return
        up = ex.up
        if up is not None:
            ex.up = None
            up.ex = None
            reset(up.transport)
        if not ex.done and not was_closed:
            # The client went away mid-exchange: still one log line.
            ex.done = True
            ex.error = "client_closed"
            if not ex.status:
                ex.status = 499
            w.account(ex)
            if w.access is not None:
                w.log_exchange(ex)

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

    # -- reading, paused for several reasons at once --------------------------
    def pause_reading(self, why: int) -> None:
        if not self.read_paused and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= why
        if self.deadline_kind == K_BODY:
            self.deadline_kind = K_NONE  # our pause is not the client's slowness

    def resume_reading(self, why: int) -> None:
        if not self.read_paused & why:
            return
        self.read_paused &= ~why
        if not self.read_paused and not self.closed:
            self.transport.resume_reading()
            self.arm()

    # -- parser events ---------------------------------------------------------------
    def on_head(self, h) -> None:
        w = self.w
        path = normalise_path(h.path)
        if path is None:
            self.reject_now("bad_request", "invalid request path")
            return
        rid = h.request_id
        if rid is not None and self.trusted and 0 < len(rid) <= 200 and rid.isascii():
            request_id = rid.decode("latin-1")
        else:
            request_id = w.next_request_id()
        ex = Exchange(self, h, path, request_id)
        if not ex.body_done:
            self.parsing = ex
        if ex.tunnel_buf is not None:
            self.tunnel_ex = ex
        if self.active is None:
            self.active = ex
            w.handle(ex)
        else:
            q = self.queue
            if q is None:
                q = self.queue = deque()
            q.append(ex)
            if len(q) > 64:
                self.pause_reading(2)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        n = len(body)
        self.body_bytes += n
        ex.body_seen += n
        if ex.done:
            return  # answered already (a refusal): the rest is read and dropped
        route = ex.route
        if route is not None and ex.body_seen > route.max_body:
            self.body_too_large(ex)
            return
        up = ex.up
        if up is not None and ex.up_head is None:
            up.deadline = self.w.now + up.target.read_timeout
            if ex.up_chunked:
                up.transport.writelines((b"%x\r\n" % n, body, b"\r\n"))
            else:
                up.transport.write(body)
            return
        buf = ex.body_buf
        if buf is None:
            buf = ex.body_buf = []
        buf.append(body)
        if ex.waiting and ex.body_seen > route.request_buffer and ex.head.seq != self.doomed:
            # Past what we buffer: from here the body streams.
            ex.waiting = False
            ex.streaming = True
            self.w.send(ex)
        elif ex.body_seen > WRITE_HIGH and ex.up is None:
            # Held for a queued exchange or a pending connect: bound it.
            self.pause_reading(4)

    def on_end(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.body_done = True
        if ex.done:
            return
        if ex.waiting:
            ex.waiting = False
            self.w.send(ex)
            return
        up = ex.up
        if up is not None and ex.up_head is None and ex.up_chunked:
            up.transport.write(b"0\r\n\r\n")

    def hold_for_tunnel(self, data: bytes) -> None:
        ex = self.tunnel_ex
        if ex is None or ex.tunnel_buf is None:
            return
        ex.tunnel_buf.append(data)
        if sum(map(len, ex.tunnel_buf)) > WRITE_HIGH:
            self.pause_reading(4)

    def continue_body(self, ex: Exchange) -> None:
        """The request is admitted: a client waiting on Expect may send its body."""
        if ex.expect and not ex.continued and not ex.body_done:
            ex.continued = True
            self.write(CONTINUE_100)

    # -- timers ------------------------------------------------------------------------
    def arm(self) -> None:
        """Set the one deadline for what the connection is doing now."""
        kind = self.deadline_kind
        if kind == K_LINGER or self.closed:
            return
        p = self.parser
        w = self.w
        if p.in_body:
            if kind != K_BODY and not self.read_paused:
                self.deadline = w.now + w.s.body_timeout
                self.body_bytes = 0
                self.deadline_kind = K_BODY
        elif p.head_pending:
            if kind != K_HEAD:
                self.deadline = w.now + w.s.header_timeout
                self.deadline_kind = K_HEAD
        elif self.active is None and not self.queue and self.upgraded is None:
            if kind != K_IDLE and kind != K_HEAD:
                self.deadline = w.now + w.s.keepalive_timeout
                self.deadline_kind = K_IDLE
                self.idle_since = w.loop.time()
        elif kind != K_NONE:
            self.deadline_kind = K_NONE

    def on_timeout(self) -> None:
        kind = self.deadline_kind
        self.deadline_kind = K_NONE
        if kind == K_HEAD:
            if self.parser.head_pending:
                self.reject_now("request_timeout", "request head not received in time")
            elif self.active is None and not self.queue:
                self.abort_silently()
        elif kind == K_BODY:
            s = self.w.s
            if self.body_bytes and self.body_bytes >= s.min_body_rate * s.body_timeout:
                self.body_bytes = 0
                self.deadline = self.w.now + s.body_timeout
                self.deadline_kind = K_BODY
            else:
                self.reject_now("request_timeout", "request body arrives too slowly")
        elif kind == K_IDLE:
            self.abort_silently()
        elif kind == K_LINGER:
            self.transport.close()

    def abort_silently(self) -> None:
        """Close a connection that has no request to answer: no bytes, no 408
        that a client reusing the connection could take for its next answer."""
        if self.closed:
            return
        self.closed = True
        self.w.conns.discard(self)
        self.transport.close()

    # -- replies ------------------------------------------------------------
    def reject_now(self, code: str, message: str) -> None:
        """Input we cannot parse or accept: answer it in order, then close."""
        if self.closed:
            return
        ex = self.active
        broken = self.parsing
        self.parsing = None
        if ex is None:
            w = self.w
            rid = w.next_request_id()
            self.write(error_reply(code, message, rid, close=True))
            w.count_status(ERROR_STATUS[code])
            if w.access is not None:
                w.log_refused(self, rid, code)
            self.close(linger=True)
        elif broken is ex:
            # The active request's own body is malformed or too slow.
            ex.body_done = False
            ex.waiting = False
            self.upstream_failed(ex, code, message)
        else:
            # Earlier requests are still being answered: stop reading, answer
            # them, then send this error and close (see finish()).
            if broken is not None and self.queue and self.queue[-1] is broken:
                self.queue.pop()
            self.pending_reject = (code, message)
            self.pause_reading(2)

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
            self.deadline_kind = K_LINGER
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
        ex.waiting = False
        up = ex.up
        if up is not None:
            ex.up = None
            up.ex = None
            reset(up.transport)
        if not ex.resp_started and self.active is ex:
            ex.body_done = False
            self.local_reply(ex, "body_too_large", f"request body exceeds {ex.route.max_body} bytes")
        else:
            ex.done = True
            self.abort()

    # -- upstream side, called by UpstreamConn and the worker --------------
    def send_upstream(self, ex: Exchange, up: UpstreamConn, head: bytes) -> None:
        """Write the head and whatever body arrived already; the rest streams."""
        self.continue_body(ex)
        buf = ex.body_buf
        if buf:
            ex.body_buf = None
            parts = [head]
            if ex.up_chunked:
                for b in buf:
                    parts += (b"%x\r\n" % len(b), b, b"\r\n")
            else:
                parts += buf
            if ex.up_chunked and ex.body_done:
                parts.append(b"0\r\n\r\n")
            data = b"".join(parts)
            self.resume_reading(4)
        elif ex.up_chunked and ex.body_done:
            data = head + b"0\r\n\r\n"
        else:
            data = head
        ex.up_head = None
        up.start(ex, data, self.w.now)
        if self.write_paused:
            up.transport.pause_reading()

    def response_head(self, ex: Exchange, rh, up: UpstreamConn) -> None:
        """The upstream's response head (a fastgate._http.ResponseHead): its
        fields pass through as one block; we add the framing, Connection, the
        rate-limit headers and x-request-id."""
        if ex is not self.active or self.closed:
            return
        status = rh.status
        ex.status = status
        ex.resp_started = True
        ex.t_head = now_ns()
        head_only = rh.no_body
        if status == 101:
            close = False
        else:
            close = not ex.keep_alive or self.w.draining or ex.upgrade is not None
        if head_only:
            frame = FRAME_NONE
        elif rh.length >= 0:
            frame = FRAME_LENGTH
        elif ex.version == "1.1":
            frame = FRAME_CHUNKED
        else:
            frame = FRAME_CLOSE
            close = True
        ex.resp_frame = frame
        parts = [status_line(status), rh.fields]
        if rh.length_raw is not None and (frame == FRAME_LENGTH or head_only):
            parts += (b"content-length: ", rh.length_raw, b"\r\n")
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
            if ex.body_done:
                up.transport.close()
            else:
                # The upstream answered before the whole body was sent: it must
                # never take what it got for a complete request.
                reset(up.transport)
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
        if close or (w.draining or self.pending_reject) and not q:
            if self.pending_reject is not None and not close:
                code, message = self.pending_reject
                self.write(error_reply(code, message, w.next_request_id(), close=True))
                w.count_status(ERROR_STATUS[code])
            self.close(linger=self.pending_reject is not None or not ex.body_done or self.parsing is not None)
            return
        if q:
            nxt = q.popleft()
            if len(q) < 32:
                self.resume_reading(2)
            self.active = nxt
            w.handle(nxt)
        if not self.closed:
            self.arm()

    def upstream_failed(self, ex: Exchange, code: str, message: str) -> None:
        up = ex.up
        if up is not None:
            ex.up = None
            up.ex = None
            if not up.closed:
                reset(up.transport)
        if ex.done or ex is not self.active or self.closed:
            return
        if ex.resp_started:
            # Never let a cut-off response look complete to the client; the
            # exchange still leaves its log line and its count.
            ex.done = True
            ex.error = "upstream_cut" if code in ("upstream_unavailable", "upstream_timeout") else code
            self.active = None
            w = self.w
            if ex.error == "upstream_cut":
                w.upstream_cuts += 1
            w.account(ex)
            if w.access is not None:
                w.log_exchange(ex)
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
        if ex is None or ex.up is not up or self.closed or ex.tunnel_buf is None:
            return False
        self.upgraded = up
        up.tunnel = self
        ex.done = True
        if rest:
            self.write(rest)
        for chunk in ex.tunnel_buf:
            if chunk:
                up.transport.write(chunk)
        ex.tunnel_buf = None
        self.tunnel_ex = None
        self.deadline_kind = K_NONE
        self.resume_reading(4)
        self.w.count_status(101)
        return True
