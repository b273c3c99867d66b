# HOT PATH, included by fastgate/_http.pyx: the client and upstream protocols
# as typed cdef classes (uvloop calls their Python-level protocol methods;
# everything between them is a C call on typed fields).
#
# The client side: one ClientConnection per client connection. Each read is
# parsed whole into a batch of events (RequestParser); each request becomes an
# Exchange that runs the decision pipeline (fastgate/pipeline.py) and streams
# to an UpstreamConn and back, with backpressure both ways.
#
# What reaches an upstream, and when:
# - Nothing of a request the parser refuses: a head whose own read also holds
#   a framing error is never dispatched.
# - A body up to ``request_buffer`` is read and validated whole before the
#   upstream is even chosen (nginx's proxy_request_buffering); a chunked one
#   then goes upstream with a Content-Length. A larger body streams
#   (re-chunked by us); a framing error found later resets the upstream
#   connection (SO_LINGER 0), so it can never take the body for complete, and
#   that connection is never pooled.
# - Bytes after the head of a WebSocket upgrade are held until the 101.
#
# Pipelined requests are queued in arrival order and answered in that order;
# at most one exchange per connection talks to an upstream at a time.
#
# Timers (one deadline per connection, swept by the worker): a connection that
# never sent a byte of a request, or an idle keep-alive one, is closed
# silently; a head that does not complete in header_timeout gets 408; a body
# must arrive at min_body_rate on average over each body_timeout window.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME

import logging as _logging
import socket as _socket
import struct as _struct
from collections import deque as _deque

from fastgate.errors import ERROR_STATUS as _ERROR_STATUS
from fastgate.ipfilter import pack_ip as _pack_ip
from fastgate.server.http1 import error_reply as _error_reply, normalise_path as _normalise_path, \
    status_line as _status_line

_log = _logging.getLogger("fastgate.worker")

cdef frozenset _IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
cdef bytes _CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes _RST = _struct.pack("ii", 1, 0)

# Backpressure: pause the peer's reading when a transport holds this much.
DEF WRITE_HIGH = 256 * 1024
WRITE_HIGH_BYTES = WRITE_HIGH
# Lingering close: discard input for at most this long, or until quiet this long.
DEF LINGER_TOTAL = 5.0
DEF LINGER_QUIET = 0.5

# What the connection's one deadline is for.
cdef enum:
    _K_NONE = 0      # no timer (an exchange is with the upstream, which has its own)
    _K_HEAD = 1      # a head is arriving (or nothing yet on a fresh connection)
    _K_BODY = 2      # a body is arriving: a min_body_rate window
    _K_IDLE = 3      # idle keep-alive
    _K_LINGER = 4    # lingering close

K_NONE, K_HEAD, K_BODY, K_IDLE, K_LINGER = _K_NONE, _K_HEAD, _K_BODY, _K_IDLE, _K_LINGER

# Response framing towards the client, decided at the response head.
cdef enum:
    _F_NONE = 0      # no body (HEAD, 1xx, 204, 304)
    _F_LENGTH = 1    # Content-Length: forwarded as is
    _F_CHUNKED = 2   # we re-chunk what the parser decoded
    _F_CLOSE = 3     # HTTP/1.0 client, body ends when we close

FRAME_NONE, FRAME_LENGTH, FRAME_CHUNKED, FRAME_CLOSE = _F_NONE, _F_LENGTH, _F_CHUNKED, _F_CLOSE


cdef inline int64_t _now_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def now_ns():
    """Latencies: a monotonic clock with µs resolution (loop.time() has 1 ms)."""
    return _now_ns()


cpdef reset(transport):
    """Abort with a TCP RST (SO_LINGER 0): the peer sees a reset, never an
    orderly end it could take for the end of a message."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _RST)
        except OSError:
            pass
    transport.abort()


cdef inline bint _plain_path(bytes path) noexcept:
    """Nothing for normalise_path to do: no '%', '\\', NUL, '//' or '/.'
    (its own fast path, without a regex or a Python call)."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path), i
    cdef uint8_t c
    if n == 0 or p[0] != 47:
        return False
    for i in range(n):
        c = p[i]
        if c == 37 or c == 92 or c == 0:
            return False
        if c == 47 and i + 1 < n and (p[i + 1] == 47 or p[i + 1] == 46):
            return False
    return True


cdef inline _pool_put(target, UpstreamConn up, double now):
    """Target.put in C: the connection becomes the warmest idle one."""
    cdef int max_idle = target.max_idle
    if max_idle == 0:
        up.transport.close()
        return
    up.idle_until = now + target.idle_timeout
    idle = target.idle
    idle.append(up)
    if len(idle) > max_idle:
        idle.popleft().transport.close()


cdef class ClientConnection
cdef class UpstreamConn
cdef class Meter


cdef class Exchange:
    """One request/response. Lives from the request head to the response end.
    Public fields are read by the pipeline's stages and the worker."""

    cdef public ClientConnection conn
    cdef public Head head
    cdef public bytes method
    cdef public bytes path
    cdef public bytes query
    cdef public str version
    cdef public bint keep_alive
    cdef public str request_id
    cdef public object route
    cdef public bytes host
    cdef public list headers
    cdef public bint chunked
    cdef public object length          # int, or None
    cdef public bint expect
    cdef public bytes upgrade
    cdef public bytes xff
    cdef public list body_buf
    cdef public bint body_done
    cdef public int64_t body_seen
    cdef public bint streaming         # the body goes upstream as it arrives
    cdef public bint waiting           # admitted; waits for its whole body before the upstream
    cdef public bint continued         # 100 Continue sent
    cdef public bint up_chunked        # the upstream gets chunked framing from us
    cdef public UpstreamConn up
    cdef public object up_head         # the pending connect, while there is one
    cdef public bint resp_started
    cdef public int resp_frame
    cdef public bint retried
    cdef public int status
    cdef public bint done
    cdef public list tunnel_buf
    cdef public bytes identity
    cdef public bytes resp_extra
    cdef public int64_t t0
    cdef public int64_t t_head
    cdef public int64_t bytes_out
    cdef public object error           # the error code of a local reply, or how the exchange broke
    cdef public object key             # (key_id, owner, plan) once a key is accepted
    cdef public object client
    cdef public object target
    cdef public int64_t key_index
    cdef public bytes authz_method     # what routes and scopes check (a route may honour method override)
    cdef public int64_t verdict        # the core's answer for the key
    cdef public int64_t rate
    cdef public bytes policy
    cdef public bytes up_path          # the path the upstream gets, when a rewrite changed it

    def __init__(self, ClientConnection conn, Head h, bytes path, str request_id):
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
        cdef list headers = h.headers
        cdef list tokens = h.conn_tokens
        if tokens:  # fields named in Connection are hop-by-hop too
            drop = set(tokens)
            headers = [f for f in headers if f[0] not in drop]
        self.headers = headers
        self.chunked = h.chunked
        self.length = h.length if h.length >= 0 else None
        self.expect = h.expect_continue and h.version == 11
        self.upgrade = h.upgrade
        self.xff = h.xff
        self.body_done = not (h.chunked or h.length > 0)
        self.tunnel_buf = [] if h.upgrade is not None else None
        self.resp_extra = b""
        self.t0 = _now_ns()
        self.key_index = -1
        self.authz_method = h.method
        self.policy = b""


cdef class ClientConnection:
    cdef public object w
    cdef public object transport
    cdef public RequestParser parser
    cdef public str peer
    cdef public bint closed
    cdef public Exchange active        # the exchange being answered
    cdef public Exchange parsing       # the exchange whose body the parser is in
    cdef public Exchange tunnel_ex     # an upgrade exchange holding bytes for its tunnel
    cdef public object queue
    cdef public double deadline
    cdef public int deadline_kind
    cdef public int64_t body_bytes     # body bytes received in the current rate window
    cdef public double idle_since
    cdef public UpstreamConn upgraded
    cdef public bint write_paused
    cdef public int read_paused        # bit 1: upstream backpressure, 2: pipelining queue, 4: held body
    cdef public bint trusted
    cdef public object pending_reject
    # While an upstream read is being parsed, writes to this client are
    # collected here and flushed as one writev (head + body in one syscall).
    cdef public list out
    cdef public bint discarding
    cdef public double linger_end
    cdef public bytes peer_packed
    cdef public bytes peer_text        # the peer address as ASCII bytes (for X-Forwarded-For)
    cdef public int doomed             # while a batch is handled: the seq of the message its error refuses
    cdef Meter meter

    def __init__(self, worker):
        self.w = worker
        self.peer = "0.0.0.0"
        self.peer_packed = b""

    # -- asyncio.Protocol (called by uvloop) -----------------------------------
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
        self.peer_packed = _pack_ip(self.peer)
        self.peer_text = self.peer.encode()
        self.trusted = w.is_trusted(self.peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        s = w.s
        self.parser = RequestParser(
            max_url=s.max_url_bytes, max_head=s.max_header_bytes, max_fields=s.max_headers,
            max_trailers=min(s.max_headers, 64), max_trailer_bytes=min(s.max_header_bytes, 8192),
            key_header=w.key_header, trusted=self.trusted, underscores=s.underscores_in_headers,
        )
        self.meter = w.meter
        w.conns.add(self)
        # A connection that never sends a byte is closed, silently, after this.
        self.idle_since = w.loop.time()
        self.deadline = w.now + s.header_timeout
        self.deadline_kind = _K_HEAD

    def data_received(self, bytes data):
        if self.upgraded is not None:
            self.upgraded.transport.write(data)
            return
        if self.discarding:
            self.deadline = min(self.w.now + LINGER_QUIET, self.linger_end)
            return
        if self.closed:
            return
        cdef list events = self.parser.feed(data)
        try:
            if events:
                self.on_events(events)
            if not self.closed:
                self.arm()
        except Exception:
            # A bug, never bad input (that is a 4xx): answer 500 if we still
            # can, and close, rather than leave the client hanging.
            _log.exception("bug while handling a request from %s", self.peer)
            self.internal_error()

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        cdef bint was_closed = self.closed
        self.closed = True
        w = self.w
        w.conns.discard(self)
        if self.upgraded is not None:
            self.upgraded.transport.close()
            return
        cdef Exchange ex = self.active
        self.active = None
        self.queue = None
        if ex is None:
            return
        cdef UpstreamConn up = ex.up
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
            self.meter.account(ex)
            if w.access is not None:
                w.log_exchange(ex)

    def pause_writing(self):
        self.write_paused = True
        if self.upgraded is not None:
            self.upgraded.transport.pause_reading()
            return
        cdef Exchange ex = self.active
        if ex is not None and ex.up is not None:
            ex.up.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.upgraded is not None:
            self.upgraded.transport.resume_reading()
            return
        cdef Exchange ex = self.active
        if ex is not None and ex.up is not None and not ex.up.closed:
            ex.up.transport.resume_reading()

    # -- parser events -----------------------------------------------------------
    cdef on_events(self, list events):
        cdef Py_ssize_t n = len(events), i = 0
        cdef int kind
        # The parser stops at an error, so it is last; the head it belongs to (if
        # it came in this same read) is never dispatched.
        self.doomed = events[n - 1][2] if events[n - 2] == EV_ERROR else 0
        while i < n:
            kind = events[i]
            value = events[i + 1]
            i += 2
            if kind == EV_BODY:
                self.on_body(<bytes>value)
            elif kind == EV_HEAD:
                if (<Head>value).seq != self.doomed:
                    self.on_head(<Head>value)
            elif kind == EV_END:
                self.on_end()
            elif kind == EV_UPGRADE:
                self.hold_for_tunnel(<bytes>value)
            else:
                self.reject_now(value[0], value[1])
            if self.closed:
                break
        self.doomed = 0

    cdef internal_error(self):
        cdef Exchange ex = self.active
        if self.closed:
            return
        if ex is not None and not ex.resp_started:
            self.parsing = None
            ex.keep_alive = False
            try:
                self.local_reply(ex, "internal_error", "internal error")
                return
            except Exception:
                _log.exception("bug while answering 500")
        self.abort()

    # -- reading, paused for several reasons at once ------------------------------
    cpdef pause_reading(self, int why):
        if not self.read_paused and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= why
        if self.deadline_kind == _K_BODY:
            self.deadline_kind = _K_NONE  # our pause is not the client's slowness

    cpdef resume_reading(self, int why):
        if not self.read_paused & why:
            return
        self.read_paused &= ~why
        if not self.read_paused and not self.closed:
            self.transport.resume_reading()
            self.arm()

    cdef on_head(self, Head h):
        w = self.w
        path = h.path if _plain_path(h.path) else _normalise_path(h.path)
        if path is None:
            self.reject_now("bad_request", "invalid request path")
            return
        rid = h.request_id
        if rid is not None and self.trusted and 0 < len(rid) <= 200 and rid.isascii():
            request_id = rid.decode("latin-1")
        else:
            request_id = next_request_id()
        cdef Exchange ex = Exchange(self, h, path, request_id)
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
                q = self.queue = _deque()
            q.append(ex)
            if len(q) > 64:
                self.pause_reading(2)

    cdef on_body(self, bytes body):
        cdef Exchange ex = self.parsing
        if ex is None:
            return
        cdef Py_ssize_t n = len(body)
        self.body_bytes += n
        ex.body_seen += n
        if ex.done:
            return  # answered already (a refusal): the rest is read and dropped
        route = ex.route
        if route is not None and ex.body_seen > route.max_body:
            self.body_too_large(ex)
            return
        cdef UpstreamConn up = ex.up
        if up is not None and ex.up_head is None:
            up.deadline = self.w.now + up.target.read_timeout
            if ex.up_chunked:
                up.transport.writelines((b"%x\r\n" % n, body, b"\r\n"))
            else:
                up.transport.write(body)
            return
        if ex.body_buf is None:
            ex.body_buf = []
        ex.body_buf.append(body)
        if ex.waiting and ex.body_seen > route.request_buffer and ex.head.seq != self.doomed:
            # Past what we buffer: from here the body streams.
            ex.waiting = False
            ex.streaming = True
            send(self.w, ex)
        elif not ex.waiting and ex.body_seen > WRITE_HIGH and ex.up is None:
            # Held for a queued exchange or a pending connect: bound it.
            self.pause_reading(4)

    cdef on_end(self):
        cdef Exchange ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.body_done = True
        if ex.done:
            return
        if ex.waiting:
            ex.waiting = False
            send(self.w, ex)
            return
        cdef UpstreamConn up = ex.up
        if up is not None and ex.up_head is None and ex.up_chunked:
            up.transport.write(b"0\r\n\r\n")

    cdef hold_for_tunnel(self, bytes data):
        cdef Exchange ex = self.tunnel_ex
        if ex is None or ex.tunnel_buf is None:
            return
        ex.tunnel_buf.append(data)
        if sum(map(len, ex.tunnel_buf)) > WRITE_HIGH:
            self.pause_reading(4)

    cpdef continue_body(self, Exchange ex):
        """The request is admitted: a client waiting on Expect may send its body."""
        if ex.expect and not ex.continued and not ex.body_done:
            ex.continued = True
            self.write(_CONTINUE_100)

    # -- timers ------------------------------------------------------------------------
    cpdef arm(self):
        """Set the one deadline for what the connection is doing now."""
        cdef int kind = self.deadline_kind
        if kind == _K_LINGER or self.closed:
            return
        cdef RequestParser p = self.parser
        w = self.w
        if S_LENGTH <= p.state <= S_TEND_LF:  # in a body
            if kind != _K_BODY and not self.read_paused:
                self.deadline = w.now + w.s.body_timeout
                self.body_bytes = 0
                self.deadline_kind = _K_BODY
        elif p.state == S_HEAD and len(p.buf) > 0:  # a head is arriving
            if kind != _K_HEAD:
                self.deadline = w.now + w.s.header_timeout
                self.deadline_kind = _K_HEAD
        elif self.active is None and not self.queue and self.upgraded is None:
            if kind != _K_IDLE and kind != _K_HEAD:
                self.deadline = w.now + w.s.keepalive_timeout
                self.deadline_kind = _K_IDLE
                self.idle_since = w.loop.time()
        elif kind != _K_NONE:
            self.deadline_kind = _K_NONE

    cpdef on_timeout(self):
        cdef int kind = self.deadline_kind
        self.deadline_kind = _K_NONE
        if kind == _K_HEAD:
            if self.parser.head_pending:
                self.reject_now("request_timeout", "request head not received in time")
            elif self.active is None and not self.queue:
                self.abort_silently()
        elif kind == _K_BODY:
            s = self.w.s
            if self.body_bytes and self.body_bytes >= s.min_body_rate * s.body_timeout:
                self.body_bytes = 0
                self.deadline = self.w.now + s.body_timeout
                self.deadline_kind = _K_BODY
            else:
                self.reject_now("request_timeout", "request body arrives too slowly")
        elif kind == _K_IDLE:
            self.abort_silently()
        elif kind == _K_LINGER:
            self.transport.close()

    cpdef abort_silently(self):
        """Close a connection that has no request to answer: no bytes, no 408
        that a client reusing the connection could take for its next answer."""
        if self.closed:
            return
        self.closed = True
        self.w.conns.discard(self)
        self.transport.close()

    # -- replies -----------------------------------------------------------------
    cpdef reject_now(self, str code, str message):
        """Input we cannot parse or accept: answer it in order, then close."""
        if self.closed:
            return
        cdef Exchange ex = self.active
        cdef Exchange broken = self.parsing
        self.parsing = None
        if ex is None:
            w = self.w
            rid = w.next_request_id()
            self.write(_error_reply(code, message, rid, close=True))
            self.meter.count_status(_ERROR_STATUS[code])
            if w.access is not None:
                w.log_refused(self, rid, code)
            self.close(True)
        elif broken is ex:
            # The active request's own body is malformed or too slow.
            ex.body_done = False
            ex.waiting = False
            self.upstream_failed(ex, code, message)
        else:
            # Earlier requests are still being answered: stop reading, answer
            # them, then send this error and close (see finish()).
            if broken is not None and self.queue and self.queue[len(self.queue) - 1] is broken:
                self.queue.pop()
            self.pending_reject = (code, message)
            self.pause_reading(2)

    cpdef write(self, bytes data):
        if self.out is None:
            self.transport.write(data)
        else:
            self.out.append(data)

    cpdef flush(self):
        """Hand what a batch produced to the transport in one writev."""
        cdef list out = self.out
        self.out = None
        if out:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    cpdef close(self, bint linger=False):
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
            self.deadline_kind = _K_LINGER
            return
        self.transport.close()

    cpdef abort(self):
        self.out = None
        self.closed = True
        self.transport.abort()

    cpdef local_reply(self, Exchange ex, str code, str message, bytes extra=b""):
        """Answer an exchange ourselves (a denial or an upstream failure)."""
        cdef bint close = not ex.keep_alive or not ex.body_done or self.w.draining or ex.upgrade is not None
        ex.resp_started = True
        ex.status = _ERROR_STATUS[code]
        ex.error = code
        self.write(_error_reply(code, message, ex.request_id, close=close, extra=extra,
                                head_only=ex.method == b"HEAD"))
        self.finish(ex, close)

    cdef body_too_large(self, Exchange ex):
        ex.waiting = False
        cdef UpstreamConn up = ex.up
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

    # -- upstream side, called by UpstreamConn and the worker ----------------------
    cpdef send_upstream(self, Exchange ex, UpstreamConn up, bytes head):
        """Write the head and whatever body arrived already; the rest streams."""
        self.continue_body(ex)
        cdef list buf = ex.body_buf
        cdef list parts
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

    cdef response_head(self, Exchange ex, ResponseHead rh, UpstreamConn up):
        """The upstream's response head: its fields pass through as one block;
        we add the framing, Connection, the rate-limit headers and x-request-id."""
        if ex is not self.active or self.closed:
            return
        cdef int status = rh.status
        cdef bint close, head_only = rh.no_body
        cdef int frame
        ex.status = status
        ex.resp_started = True
        ex.t_head = _now_ns()
        if status == 101:
            close = False
        else:
            close = not ex.keep_alive or self.w.draining or ex.upgrade is not None
        if head_only:
            frame = _F_NONE
        elif rh.length >= 0:
            frame = _F_LENGTH
        elif ex.version == "1.1":
            frame = _F_CHUNKED
        else:
            frame = _F_CLOSE
            close = True
        ex.resp_frame = frame
        _ob_reset()
        _ob_bytes(_status_line(status))
        _ob_bytes(rh.fields)
        if rh.length_raw is not None and (frame == _F_LENGTH or head_only):
            _ob_bytes(b"content-length: ")
            _ob_bytes(rh.length_raw)
            _ob_bytes(b"\r\n")
        elif frame == _F_CHUNKED:
            _ob_bytes(b"transfer-encoding: chunked\r\n")
        if close:
            _ob_bytes(b"connection: close\r\n")
        elif ex.version == "1.0":
            _ob_bytes(b"connection: keep-alive\r\n")
        if ex.resp_extra:
            _ob_bytes(ex.resp_extra)
        _ob_bytes(b"x-request-id: ")
        _ob_bytes(ex.request_id.encode())
        _ob_bytes(b"\r\n\r\n")
        self.write(_ob_take())
        if close:
            ex.keep_alive = False

    cdef response_body(self, Exchange ex, bytes body):
        if ex is not self.active or self.closed:
            return
        ex.bytes_out += len(body)
        if ex.resp_frame == _F_CHUNKED:
            self.write(b"%x\r\n" % len(body))
            self.write(body)
            self.write(b"\r\n")
        else:
            self.write(body)

    cdef response_complete(self, Exchange ex, UpstreamConn up, bint reusable):
        if ex.done:
            return
        ex.done = True
        if ex.up is up:
            ex.up = None
        up.ex = None
        if reusable and ex.body_done and not up.closed and ex.upgrade is None:
            up.reused = True
            _pool_put(up.target, up, self.w.now)
        elif not up.closed:
            if ex.body_done:
                up.transport.close()
            else:
                # The upstream answered before the whole body was sent: it must
                # never take what it got for a complete request.
                reset(up.transport)
        if ex is not self.active or self.closed:
            return
        if ex.resp_frame == _F_CHUNKED:
            self.write(b"0\r\n\r\n")
        self.finish(ex, not ex.keep_alive or not ex.body_done or ex.resp_frame == _F_CLOSE)

    cdef finish(self, Exchange ex, bint close):
        ex.done = True
        self.active = None
        w = self.w
        self.meter.account(ex)
        if w.access is not None:
            w.log_exchange(ex)
        q = self.queue
        if close or (w.draining or self.pending_reject) and not q:
            if self.pending_reject is not None and not close:
                code, message = self.pending_reject
                self.write(_error_reply(code, message, w.next_request_id(), close=True))
                self.meter.count_status(_ERROR_STATUS[code])
            self.close(self.pending_reject is not None or not ex.body_done or self.parsing is not None)
            return
        cdef Exchange nxt
        if q:
            nxt = q.popleft()
            if len(q) < 32:
                self.resume_reading(2)
            self.active = nxt
            w.handle(nxt)
        if not self.closed:
            self.arm()

    cpdef upstream_failed(self, Exchange ex, str code, str message):
        cdef UpstreamConn up = ex.up
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
            self.meter.account(ex)
            if w.access is not None:
                w.log_exchange(ex)
            self.abort()
            return
        self.local_reply(ex, code, message)

    cdef upstream_lost(self, Exchange ex, UpstreamConn up):
        if ex.up is up:
            ex.up = None
        if ex.done or ex is not self.active or self.closed:
            return
        if (up.reused and not up.got_bytes and not ex.retried and ex.method in _IDEMPOTENT
                and (ex.length is None or ex.length == 0) and not ex.chunked):
            # A pooled connection the upstream had already closed: one retry
            # on a fresh connection, only when nothing can have been acted on twice.
            ex.retried = True
            self.w.connect(ex, up.target)
            return
        self.upstream_failed(ex, "upstream_unavailable", "upstream closed the connection")

    cdef bint upstream_upgraded(self, UpstreamConn up, bytes rest):
        """The upstream answered 101: from now on both sides are a byte pipe."""
        cdef Exchange ex = self.active
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
        self.deadline_kind = _K_NONE
        self.resume_reading(4)
        self.meter.count_status(101)
        return True


cdef class UpstreamConn:
    """One keep-alive HTTP/1.1 connection to an upstream target. Drives one
    exchange at a time: writes the request the client side hands it, parses
    the response (ResponseParser) and hands head and body back. Never
    pipelines to the upstream."""

    cdef public object target
    cdef public object transport
    cdef public ResponseParser parser
    cdef public Exchange ex
    cdef public bint closed
    cdef public bint reused
    cdef public double idle_until
    cdef public double deadline
    cdef public bint got_bytes
    cdef public ClientConnection tunnel
    cdef public bint resp_done
    cdef public bint reusable

    def __init__(self, target):
        self.target = target
        self.parser = ResponseParser()

    # -- asyncio.Protocol (called by uvloop) -----------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, bytes data):
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        cdef Exchange ex = self.ex
        if ex is None:
            # An idle pooled connection must not speak: the pooled state is unknown now.
            self.transport.close()
            return
        self.got_bytes = True
        cdef ClientConnection client = ex.conn
        self.deadline = client.w.now + self.target.read_timeout
        client.out = []
        try:
            self.on_events(self.parser.feed(data))
        finally:
            client.flush()

    cdef on_events(self, list events):
        cdef Py_ssize_t n = len(events), i = 0
        cdef int kind
        cdef Exchange ex
        while i < n:
            kind = events[i]
            value = events[i + 1]
            i += 2
            ex = self.ex
            if kind == EV_BODY:
                if ex is not None:
                    ex.conn.response_body(ex, <bytes>value)
            elif kind == EV_HEAD:
                if ex is None:
                    return
                # A connection that answered HEAD is never pooled: some upstreams
                # send a body anyway, which would be read as the next response.
                self.reusable = (<ResponseHead>value).keep_alive and ex.method != b"HEAD"
                ex.conn.response_head(ex, <ResponseHead>value, self)
            elif kind == EV_END:
                if ex is None or self.resp_done:
                    continue
                self.resp_done = True
                ex.conn.response_complete(ex, self, self.reusable)
            elif kind == EV_UPGRADE:
                if ex is None or not ex.conn.upstream_upgraded(self, <bytes>value):
                    self.transport.close()
                return
            else:
                self.transport.abort()
                if ex is not None:
                    ex.conn.upstream_failed(ex, "upstream_unavailable", f"invalid response from upstream: {value[1]}")
                return

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.transport.close()
            return
        cdef Exchange ex = self.ex
        if ex is None:
            self.target.discard(self)
            return
        cdef ClientConnection client = ex.conn
        if self.parser.state == S_UNTIL_CLOSE:
            # a close-delimited body: EOF is its end
            client.out = []
            try:
                self.on_events(self.parser.eof())
            finally:
                client.flush()
            return
        self.ex = None
        if not self.resp_done:
            client.upstream_lost(ex, self)

    def pause_writing(self):
        if self.ex is not None:
            self.ex.conn.pause_reading(1)

    def resume_writing(self):
        if self.ex is not None and not self.ex.conn.closed:
            self.ex.conn.resume_reading(1)

    # -- driven by the client side ---------------------------------------------
    cpdef start(self, Exchange ex, bytes head, double now):
        self.ex = ex
        self.resp_done = False
        self.reusable = False
        self.got_bytes = False
        self.deadline = now + self.target.read_timeout
        self.parser.start(ex.method == b"HEAD", ex.upgrade is not None)
        ex.up = self
        self.transport.write(head)
