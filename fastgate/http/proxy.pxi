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
# Per-request state, one owner per object (each is written only by its own
# methods, or by the one party named here; the others read it):
# - Head: the parsed request head (the parser).
# - Exchange: the request body as it arrives and the response towards the
#   client (status, framing, bytes out); driven by its ClientConnection.
# - Decision: what the pipeline decided (route, client address, key, rate
#   answer, the fields and path the upstream gets); written by the stages.
# - Leg: the upstream side of the exchange (the connection it holds or the
#   connect it waits on, the body framing towards it).
# - Timings: when the exchange started, went upstream, got its response
#   head and ended.
# The upstream side knows the client side only as a ResponseSink: head,
# body, end, failure, loss, upgrade, and backpressure; no back-references.
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
from fastgate.config import parse_hostport as _parse_hostport
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


cdef list _STATUS_LINES = [None] * 1000


cdef inline bytes _status_bytes(int status):
    """http1.status_line, cached by status in a list (not a Python call a response)."""
    if not 0 <= status < 1000:
        return _status_line(status)
    line = _STATUS_LINES[status]
    if line is None:
        line = _STATUS_LINES[status] = _status_line(status)
    return line


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


cdef class ClientConnection
cdef class UpstreamConn
cdef class Meter


cdef class Target:
    """One upstream host:port with its idle keep-alive connections (LIFO:
    warmest first). A cdef class so the data plane reads its settings and its
    pool as C fields; reused across reloads (apply) so the pool survives."""

    cdef readonly str name
    cdef readonly str host
    cdef readonly int port
    cdef readonly bytes host_header
    cdef readonly object idle          # deque of UpstreamConn
    cdef readonly int max_idle
    cdef readonly double idle_timeout
    cdef readonly double connect_timeout
    cdef readonly double read_timeout
    cdef readonly list counts          # connects, reuses, connect errors (kept across reloads)

    def __init__(self, str addr, uc):
        self.host, self.port = _parse_hostport(addr)
        self.name = addr
        self.host_header = addr.encode()
        self.idle = _deque()
        self.counts = [0, 0, 0]
        self.apply(uc)

    def apply(self, uc):
        self.max_idle = uc.max_idle
        self.idle_timeout = uc.idle_timeout
        self.connect_timeout = uc.connect_timeout
        self.read_timeout = uc.read_timeout
        while len(self.idle) > self.max_idle:
            self.idle.popleft().transport.close()

    cpdef UpstreamConn get(self):
        """The warmest idle connection that is still open, or None."""
        cdef UpstreamConn up
        idle = self.idle
        while idle:
            up = idle.pop()
            if not up.closed:
                return up
        return None

    cdef put(self, UpstreamConn up, double now):
        if self.max_idle == 0:
            up.transport.close()
            return
        up.idle_until = now + self.idle_timeout
        idle = self.idle
        idle.append(up)
        if len(idle) > self.max_idle:
            idle.popleft().transport.close()

    def discard(self, conn):
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def expire(self, double now):
        idle = self.idle
        while idle and (<UpstreamConn>idle[0]).idle_until <= now:
            idle.popleft().transport.close()

    def close_all(self):
        while self.idle:
            self.idle.pop().transport.close()


@cython.freelist(64)  # one per request: reused, not malloc'd and freed
cdef class Timings:
    """When one exchange did what (monotonic ns). Written only by its Exchange."""

    cdef readonly int64_t start       # the request head was parsed
    cdef readonly int64_t sent        # its head went to an upstream connection (0: never)
    cdef readonly int64_t response    # the upstream's response head arrived (0: none)
    cdef readonly int64_t end         # the exchange ended (0: not yet)

    @property
    def total_us(self):
        return ((self.end or _now_ns()) - self.start) // 1000

    @property
    def upstream_us(self):
        """Start to the upstream's response head, or None."""
        return (self.response - self.start) // 1000 if self.response else None


@cython.freelist(64)  # one per request: reused, not malloc'd and freed
cdef class Decision:
    """What the pipeline decided for one request. Written by the stages
    (stages.pxi, and stages written in Python); read by the upstream head,
    the access log and the meter."""

    cdef public object route
    cdef public object client          # the client address (str), once client_ip ran
    cdef public bytes authz_method     # what routes and scopes check (a route may honour method override)
    cdef public bint take_key          # the key fields are not forwarded (the key stage took them)
    cdef public bytes add_fields       # field lines added to what the upstream gets ("Name: value\r\n" each)
    cdef public bytes query            # the query the upstream gets (the key's parameter removed)
    cdef public bytes up_path          # the path the upstream gets, when a rewrite changed it
    cdef public bytes identity         # x-fastgate-* fields naming the key to the upstream
    cdef public object key             # (key_id, owner, plan) once a key is accepted
    cdef public int64_t key_index
    cdef public int64_t verdict        # the core's answer for the key
    cdef public int64_t rate           # the core's answer for the key's limits
    cdef public bytes policy           # the RateLimit-Policy field of those limits
    cdef public bytes resp_extra       # fields added to the response (rate-limit state)
    cdef public object target          # the upstream target chosen

    cdef init(self, Head h):
        self.add_fields = b""
        self.query = h.query
        self.authz_method = h.method
        self.key_index = -1
        self.policy = b""
        self.resp_extra = b""


@cython.freelist(64)  # one per request: reused, not malloc'd and freed
cdef class Leg:
    """The upstream side of one exchange: the connection it holds, or the
    connect it waits on, and how its body is framed. Written only here."""

    cdef readonly UpstreamConn up
    cdef readonly object pending       # the connect future, while there is one
    cdef readonly bint chunked         # the upstream gets chunked framing from us
    cdef readonly bint retried

    cdef inline bint streaming(self):
        """Connected and its head sent: body bytes go straight through."""
        return self.up is not None and self.pending is None

    cdef connecting(self, fut):
        self.up = None
        self.pending = fut

    cdef attach(self, UpstreamConn up, bint chunked):
        self.pending = None
        self.up = up
        self.chunked = chunked

    cdef UpstreamConn release(self):
        """Let go of the connection (its owner pools or closes it)."""
        cdef UpstreamConn up = self.up
        self.up = None
        return up

    cdef cut(self):
        """Drop the connection with a reset: it must never take what it got
        for a complete request, and is never pooled."""
        cdef UpstreamConn up = self.release()
        if up is not None:
            up.cut()

    cdef retry(self):
        self.retried = True
        self.up = None


cdef class ResponseSink:
    """All an upstream connection knows of the client side: where a response
    goes, and who to tell about backpressure and failure."""

    cdef double clock(self):
        return 0.0

    cdef begin(self):
        """A read from the upstream starts: what it produces leaves in one write."""

    cdef flush(self):
        """That read is done."""

    cdef bint sent_whole(self):
        """The whole request body went out (else the connection must be reset)."""
        return False

    cdef response_head(self, ResponseHead rh):
        pass

    cdef response_body(self, bytes data):
        pass

    cdef response_end(self):
        """The response is complete (the connection was pooled or closed)."""

    cpdef upstream_failed(self, str code, str message):
        """The upstream cannot answer (the connection is gone)."""

    cdef upstream_lost(self, bint silent_reuse):
        """The connection closed before a complete response. silent_reuse: it
        was a pooled one that never sent a byte (a request may be retried)."""

    cdef bint upstream_tunnel(self, UpstreamConn up, bytes rest) except -1:
        """The upstream answered 101; False: the client side cannot tunnel."""
        return False

    cdef upstream_paused(self):
        """The upstream cannot take more request body for now."""

    cdef upstream_resumed(self):
        pass


cdef class Exchange(ResponseSink):  # (a subtype: Cython keeps no freelist for it)
    """One request/response, from the request head to the response end: the
    request body as it arrives and the response towards the client. Driven by
    its ClientConnection; an upstream connection reaches it as a ResponseSink."""

    cdef readonly ClientConnection conn
    cdef readonly Head head
    cdef readonly bytes path           # normalised
    cdef readonly bytes rid            # the request id, as it goes on the wire
    cdef readonly Decision d
    cdef readonly Leg leg
    cdef readonly Timings t
    cdef readonly bint keep_alive
    # the request body
    cdef readonly bint body_done
    cdef readonly int64_t body_seen
    cdef readonly bint streaming       # the body goes upstream as it arrives
    cdef readonly bint waiting         # admitted; waits for its whole body before the upstream
    cdef bint continued                # 100 Continue sent
    cdef list body_buf
    cdef list tunnel_buf               # bytes after an upgrade head, held until the 101
    # the response towards the client
    cdef readonly int status
    cdef readonly object error         # the error code of a local reply, or how the exchange broke
    cdef readonly bint resp_started
    cdef int resp_frame
    cdef readonly int64_t bytes_out
    cdef readonly bint done

    @staticmethod
    cdef Exchange new(ClientConnection conn, Head h, bytes path, bytes rid):
        """(Not a Python constructor: argument parsing per request costs more than the rest.)"""
        cdef Exchange self = Exchange.__new__(Exchange)
        self.conn = conn
        self.head = h
        self.path = path
        self.rid = rid
        self.keep_alive = h.keep_alive
        self.d = Decision.__new__(Decision)
        self.d.init(h)
        self.leg = Leg.__new__(Leg)
        self.t = Timings.__new__(Timings)
        self.t.start = _now_ns()
        self.body_done = not (h.chunked or h.length > 0)
        if h.upgrade is not None:
            self.tunnel_buf = []
        return self

    # -- for the stages and the worker (Python-visible) ----------------------------
    @property
    def method(self):
        return self.head.method

    @property
    def request_id(self):
        return self.rid.decode("latin-1")

    @property
    def length(self):
        """Content-Length, or None."""
        return self.head.length if self.head.length >= 0 else None

    cpdef reply(self, str code, str message, bytes extra=b""):
        """Answer the request ourselves (a denial, or an upstream failure)."""
        cdef ClientConnection conn = self.conn
        cdef Head h = self.head
        cdef bint close = not self.keep_alive or not self.body_done or conn.w.draining or h.upgrade is not None
        self.resp_started = True
        self.status = _ERROR_STATUS[code]
        self.error = code
        conn.write(_error_reply(code, message, self.rid.decode("latin-1"), close=close, extra=extra,
                                head_only=h.method == b"HEAD"))
        conn.finish(self, close)

    cpdef continue_body(self):
        """The request is admitted: a client waiting on Expect may send its body."""
        if not self.continued and not self.body_done and self.head.expect_continue and self.head.version == 11:
            self.continued = True
            self.conn.write(_CONTINUE_100)

    cpdef admitted(self):
        """The pipeline is through: a body up to request_buffer is read whole
        first; a larger one streams from here. True: go upstream now."""
        cdef int64_t rb
        if self.body_done:
            return True
        rb = self.d.route.request_buffer
        cdef int64_t n = self.head.length
        if n > rb or self.body_seen > rb:
            self.streaming = True
            return True
        self.waiting = True
        self.continue_body()
        return False

    cpdef connecting(self, fut):
        self.leg.connecting(fut)

    cpdef connected(self, fut, target, w):
        """The connect for this exchange finished (done, failed or cancelled)."""
        cdef ClientConnection conn = self.conn
        cdef bint wanted = not conn.closed and conn.active is self and not self.done
        self.leg.attach(None, False)
        if fut.cancelled():
            if wanted:
                self.upstream_failed("upstream_timeout", f"connecting to {target.host}:{target.port} timed out")
            return
        if fut.exception() is not None:
            target.counts[2] += 1
            if wanted:
                self.upstream_failed("upstream_unavailable", f"cannot connect to upstream {target.host}:{target.port}")
            return
        cdef UpstreamConn up = fut.result()[1]
        if not wanted:
            up.transport.close()
            return
        self.send(up, build_head(w, self, target))

    cpdef bint overdue(self, double now):
        """The upstream has not answered within its read timeout."""
        cdef UpstreamConn up = self.leg.up
        return up is not None and not self.done and now >= up.deadline

    # -- request side, driven by the ClientConnection ---------------------------------
    cdef bint take_body(self, bytes body) except -1:
        """A body chunk arrived; False: it broke the route's body limit."""
        cdef Py_ssize_t n = len(body)
        cdef ClientConnection conn = self.conn
        self.body_seen += n
        if self.done:
            return True  # answered already (a refusal): the rest is read and dropped
        route = self.d.route
        if route is not None and self.body_seen > route.max_body:
            return False
        cdef Leg leg = self.leg
        if leg.streaming():
            leg.up.send_body(body, leg.chunked, conn.w.now)
            return True
        if self.body_buf is None:
            self.body_buf = []
        self.body_buf.append(body)
        if self.waiting and self.body_seen > route.request_buffer and self.head.seq != conn.doomed:
            # Past what we buffer: from here the body streams.
            self.waiting = False
            self.streaming = True
            send(conn.w, self)
        elif not self.waiting and self.body_seen > WRITE_HIGH and leg.up is None:
            # Held for a queued exchange or a pending connect: bound it.
            conn.pause_reading(4)
        return True

    cdef body_end(self):
        self.body_done = True
        if self.done:
            return
        if self.waiting:
            self.waiting = False
            send(self.conn.w, self)
            return
        cdef Leg leg = self.leg
        if leg.streaming() and leg.chunked:
            leg.up.send_raw(b"0\r\n\r\n")

    cdef hold(self, bytes data):
        """Bytes after an upgrade head: kept until the upstream's 101."""
        if self.tunnel_buf is None:
            return
        self.tunnel_buf.append(data)
        if sum(map(len, self.tunnel_buf)) > WRITE_HIGH:
            self.conn.pause_reading(4)

    cdef body_broken(self, str code, str message):
        """The request's own body is malformed, too slow or too large."""
        self.body_done = False
        self.waiting = False
        self.upstream_failed(code, message)

    cpdef send(self, UpstreamConn up, bytes head):
        """Hand the request to an upstream connection: the head and whatever
        body arrived already; the rest streams."""
        self.continue_body()
        cdef Head h = self.head
        cdef bint chunked = h.chunked and not self.body_done  # a whole body goes with a length
        cdef list buf = self.body_buf
        cdef list parts
        if buf:
            self.body_buf = None
            parts = [head]
            if chunked:
                for b in buf:
                    parts += (b"%x\r\n" % len(b), b, b"\r\n")
            else:
                parts += buf
            data = b"".join(parts)
            self.conn.resume_reading(4)
        else:
            data = head
        self.leg.attach(up, chunked)
        self.t.sent = _now_ns()
        up.start(self, data, self.conn.w.now, h.method == b"HEAD", h.upgrade is not None)
        if self.conn.write_paused:
            up.pause()

    cdef abandon(self):
        """The client went away mid-exchange."""
        self.leg.cut()
        if self.done:
            return
        self.done = True
        self.t.end = _now_ns()
        self.error = "client_closed"
        if not self.status:
            self.status = 499

    cdef ended(self):
        self.done = True
        self.t.end = _now_ns()

    cdef internal_error(self):
        """A bug while handling this request: 500 if nothing was sent, and close."""
        self.keep_alive = False
        self.reply("internal_error", "internal error")

    # -- ResponseSink: the upstream side ----------------------------------------------
    cdef bint _current(self):
        return self.conn.active is self and not self.conn.closed

    cdef double clock(self):
        return self.conn.w.now

    cdef begin(self):
        self.conn.out = []

    cdef flush(self):
        self.conn.flush()

    cdef bint sent_whole(self):
        return self.body_done

    cdef response_head(self, ResponseHead rh):
        """The upstream's response head: its fields pass through as one block;
        we add the framing, Connection, the rate-limit fields and x-request-id."""
        if not self._current():
            return
        cdef ClientConnection conn = self.conn
        cdef int status = rh.status
        cdef bint close, head_only = rh.no_body
        cdef bint v11 = self.head.version == 11
        cdef int frame
        self.status = status
        self.resp_started = True
        self.t.response = _now_ns()
        if status == 101:
            close = False
        else:
            close = not self.keep_alive or conn.w.draining or self.head.upgrade is not None
        if head_only:
            frame = _F_NONE
        elif rh.length >= 0:
            frame = _F_LENGTH
        elif v11:
            frame = _F_CHUNKED
        else:
            frame = _F_CLOSE
            close = True
        self.resp_frame = frame
        _ob_reset()
        _ob_bytes(_status_bytes(status))
        _ob_bytes(rh.fields)
        if rh.length_raw is not None and (frame == _F_LENGTH or head_only):
            _ob_bytes(b"content-length: ")
            _ob_bytes(rh.length_raw)
            _ob_bytes(b"\r\n")
        elif frame == _F_CHUNKED:
            _ob_bytes(b"transfer-encoding: chunked\r\n")
        if close:
            _ob_bytes(b"connection: close\r\n")
        elif not v11:
            _ob_bytes(b"connection: keep-alive\r\n")
        if self.d.resp_extra:
            _ob_bytes(self.d.resp_extra)
        _ob_bytes(b"x-request-id: ")
        _ob_bytes(self.rid)
        _ob_bytes(b"\r\n\r\n")
        conn.write(_ob_take())
        if close:
            self.keep_alive = False

    cdef response_body(self, bytes data):
        if not self._current():
            return
        cdef ClientConnection conn = self.conn
        self.bytes_out += len(data)
        if self.resp_frame == _F_CHUNKED:
            conn.write(b"%x\r\n" % len(data))
            conn.write(data)
            conn.write(b"\r\n")
        else:
            conn.write(data)

    cdef response_end(self):
        if self.done:
            return
        self.leg.release()
        if not self._current():
            self.ended()
            return
        if self.resp_frame == _F_CHUNKED:
            self.conn.write(b"0\r\n\r\n")
        self.conn.finish(self, not self.keep_alive or not self.body_done or self.resp_frame == _F_CLOSE)

    cpdef upstream_failed(self, str code, str message):
        self.leg.cut()
        if self.done or not self._current():
            return
        cdef ClientConnection conn = self.conn
        if self.resp_started:
            # Never let a cut-off response look complete to the client; the
            # exchange still leaves its log line and its count.
            self.ended()
            self.error = "upstream_cut" if code == "upstream_unavailable" or code == "upstream_timeout" else code
            conn.ended_broken(self)
            return
        self.reply(code, message)

    cdef upstream_lost(self, bint silent_reuse):
        self.leg.release()
        if self.done or not self._current():
            return
        cdef Head h = self.head
        if (silent_reuse and not self.leg.retried and h.method in _IDEMPOTENT
                and h.length <= 0 and not h.chunked):
            # A pooled connection the upstream had already closed: one retry
            # on a fresh connection, only when nothing can have been acted on twice.
            self.leg.retry()
            self.conn.w.connect(self, self.d.target)
            return
        self.upstream_failed("upstream_unavailable", "upstream closed the connection")

    cdef bint upstream_tunnel(self, UpstreamConn up, bytes rest) except -1:
        if self.leg.up is not up or not self._current() or self.tunnel_buf is None:
            return False
        cdef list held = self.tunnel_buf
        self.tunnel_buf = None
        self.leg.release()
        self.ended()
        self.conn.start_tunnel(up, rest, held)
        return True

    cdef upstream_paused(self):
        self.conn.pause_reading(1)

    cdef upstream_resumed(self):
        if not self.conn.closed:
            self.conn.resume_reading(1)


cdef class ClientConnection:
    """One client connection: reads, parses, queues exchanges in order, and
    owns the transport, the timers and the lingering close."""

    cdef readonly object w
    cdef readonly object transport
    cdef readonly RequestParser parser
    cdef readonly str peer
    cdef readonly bint closed
    cdef readonly Exchange active      # the exchange being answered
    cdef readonly Exchange parsing     # the exchange whose body the parser is in
    cdef Exchange tunnel_ex            # an upgrade exchange holding bytes for its tunnel
    cdef readonly object queue
    cdef readonly double deadline
    cdef readonly int deadline_kind
    cdef int64_t body_bytes            # body bytes received in the current rate window
    cdef readonly double idle_since    # monotonic s: the oldest idle connections are shed first
    cdef readonly UpstreamConn upgraded
    cdef readonly bint write_paused
    cdef readonly int read_paused      # bit 1: upstream backpressure, 2: pipelining queue, 4: held body
    cdef readonly bint trusted
    cdef object pending_reject
    # While an upstream read is being parsed, writes to this client are
    # collected here and flushed as one writev (head + body in one syscall).
    cdef list out
    cdef bint discarding
    cdef double linger_end
    cdef readonly bytes peer_packed
    cdef readonly bytes peer_text      # the peer address as ASCII bytes (for X-Forwarded-For)
    cdef int doomed                    # while a batch is handled: the seq of the message its error refuses
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
        self.idle_since = _now_ns() / 1e9
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
        cdef bint was_done = ex.done
        ex.abandon()
        if not was_done and not was_closed:
            self.account(ex)  # the client went away mid-exchange: still one log line

    def pause_writing(self):
        self.write_paused = True
        if self.upgraded is not None:
            self.upgraded.transport.pause_reading()
            return
        cdef Exchange ex = self.active
        if ex is not None and ex.leg.up is not None:
            ex.leg.up.pause()

    def resume_writing(self):
        self.write_paused = False
        if self.upgraded is not None:
            self.upgraded.transport.resume_reading()
            return
        cdef Exchange ex = self.active
        if ex is not None and ex.leg.up is not None:
            ex.leg.up.resume()

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
                if self.tunnel_ex is not None:
                    self.tunnel_ex.hold(<bytes>value)
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
            try:
                ex.internal_error()
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
        path = h.path if _plain_path(h.path) else _normalise_path(h.path)
        if path is None:
            self.reject_now("bad_request", "invalid request path")
            return
        rid = h.request_id  # a trusted proxy's id is kept
        if rid is None or not self.trusted or not 0 < len(rid) <= 200 or not rid.isascii():
            rid = _next_rid()
        cdef Exchange ex = Exchange.new(self, h, path, rid)
        if not ex.body_done:
            self.parsing = ex
        if h.upgrade is not None:
            self.tunnel_ex = ex
        if self.active is None:
            self.active = ex
            handle(self.w, ex)
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
        self.body_bytes += len(body)
        if not ex.take_body(body):
            self.body_too_large(ex)

    cdef on_end(self):
        cdef Exchange ex = self.parsing
        self.parsing = None
        if ex is not None:
            ex.body_end()

    cdef body_too_large(self, Exchange ex):
        if self.active is ex:
            ex.body_broken("body_too_large", f"request body exceeds {ex.d.route.max_body} bytes")
        else:  # a queued request: it is never answered
            ex.ended()
            self.abort()

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
                self.idle_since = _now_ns() / 1e9  # (w.now only moves on the tick)
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
            rid = next_request_id()
            self.write(_error_reply(code, message, rid, close=True))
            self.meter.count_status(_ERROR_STATUS[code])
            if w.access is not None:
                w.log_refused(self, rid, code)
            self.close(True)
        elif broken is ex:
            ex.body_broken(code, message)
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

    cdef account(self, Exchange ex):
        """One exchange ended: its counts, and its log line when the log is on."""
        self.meter.account(ex)
        w = self.w
        if w.access is not None:
            w.log_exchange(ex)

    cdef finish(self, Exchange ex, bint close):
        """The active exchange is answered: account for it, then the next one."""
        ex.ended()
        self.active = None
        self.account(ex)
        w = self.w
        q = self.queue
        if close or (w.draining or self.pending_reject) and not q:
            if self.pending_reject is not None and not close:
                code, message = self.pending_reject
                self.write(_error_reply(code, message, next_request_id(), close=True))
                self.meter.count_status(_ERROR_STATUS[code])
            self.close(self.pending_reject is not None or not ex.body_done or self.parsing is not None)
            return
        cdef Exchange nxt
        if q:
            nxt = q.popleft()
            if len(q) < 32:
                self.resume_reading(2)
            self.active = nxt
            handle(w, nxt)
        if not self.closed:
            self.arm()

    cdef ended_broken(self, Exchange ex):
        """The active exchange broke mid-response: account for it and abort."""
        self.active = None
        if ex.error == "upstream_cut":
            self.w.upstream_cuts += 1
        self.account(ex)
        self.abort()

    cdef start_tunnel(self, UpstreamConn up, bytes rest, list held):
        """The upstream answered 101: from now on both sides are a byte pipe."""
        self.upgraded = up
        up.tunnel_to(self.transport)
        self.active = None
        if rest:
            self.write(rest)
        for chunk in held:
            if chunk:
                up.transport.write(chunk)
        self.tunnel_ex = None
        self.deadline_kind = _K_NONE
        self.resume_reading(4)
        self.meter.count_status(101)


cdef class UpstreamConn:
    """One keep-alive HTTP/1.1 connection to an upstream target. Drives one
    exchange at a time: writes the request it is handed, parses the response
    (ResponseParser) and hands head and body to the exchange's ResponseSink.
    Never pipelines to the upstream."""

    cdef readonly Target target
    cdef readonly object transport
    cdef ResponseParser parser
    cdef ResponseSink sink
    cdef readonly bint closed
    cdef readonly bint reused
    cdef double idle_until
    cdef readonly double deadline
    cdef bint got_bytes
    cdef object tunnel                 # the client transport, once this is a tunnel
    cdef bint resp_done
    cdef bint reusable
    cdef bint head_request
    cdef bint upgrade

    def __init__(self, Target target):
        self.target = target
        self.parser = ResponseParser()

    # -- asyncio.Protocol (called by uvloop) -----------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, bytes data):
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        cdef ResponseSink sink = self.sink
        if sink is None:
            # An idle pooled connection must not speak: the pooled state is unknown now.
            self.transport.close()
            return
        self.got_bytes = True
        self.deadline = sink.clock() + self.target.read_timeout
        sink.begin()
        try:
            self.on_events(self.parser.feed(data))
        finally:
            sink.flush()

    cdef on_events(self, list events):
        cdef Py_ssize_t n = len(events), i = 0
        cdef int kind
        cdef ResponseSink sink
        while i < n:
            kind = events[i]
            value = events[i + 1]
            i += 2
            sink = self.sink
            if kind == EV_BODY:
                if sink is not None:
                    sink.response_body(<bytes>value)
            elif kind == EV_HEAD:
                if sink is None:
                    return
                # A connection that answered HEAD is never pooled: some upstreams
                # send a body anyway, which would be read as the next response.
                self.reusable = (<ResponseHead>value).keep_alive and not self.head_request and not self.upgrade
                sink.response_head(<ResponseHead>value)
            elif kind == EV_END:
                if sink is None or self.resp_done:
                    continue
                self.resp_done = True
                self.sink = None
                if self.reusable and sink.sent_whole() and not self.closed:
                    self.reused = True
                    self.pool(sink.clock())
                elif not self.closed:
                    if sink.sent_whole():
                        self.transport.close()
                    else:
                        # The upstream answered before the whole body was sent: it must
                        # never take what it got for a complete request.
                        reset(self.transport)
                sink.response_end()
            elif kind == EV_UPGRADE:
                if sink is None or not sink.upstream_tunnel(self, <bytes>value):
                    self.transport.close()
                return
            else:
                self.sink = None
                self.transport.abort()
                if sink is not None:
                    sink.upstream_failed("upstream_unavailable", f"invalid response from upstream: {value[1]}")
                return

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.close()
            return
        cdef ResponseSink sink = self.sink
        if sink is None:
            self.target.discard(self)
            return
        if self.parser.state == S_UNTIL_CLOSE:
            # a close-delimited body: EOF is its end
            sink.begin()
            try:
                self.on_events(self.parser.eof())
            finally:
                sink.flush()
            return
        self.sink = None
        if not self.resp_done:
            sink.upstream_lost(self.reused and not self.got_bytes)

    def pause_writing(self):
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif self.sink is not None:
            self.sink.upstream_paused()

    def resume_writing(self):
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif self.sink is not None:
            self.sink.upstream_resumed()

    # -- driven by the exchange it serves ----------------------------------------
    cdef start(self, ResponseSink sink, bytes data, double now, bint head_only, bint upgrade):
        self.sink = sink
        self.resp_done = False
        self.reusable = False
        self.got_bytes = False
        self.head_request = head_only
        self.upgrade = upgrade
        self.deadline = now + self.target.read_timeout
        self.parser.start(head_only, upgrade)
        self.transport.write(data)

    cdef send_body(self, bytes body, bint chunked, double now):
        self.deadline = now + self.target.read_timeout
        if chunked:
            self.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.transport.write(body)

    cdef send_raw(self, bytes data):
        self.transport.write(data)

    cdef cut(self):
        """Reset and forget the exchange: never pooled."""
        self.sink = None
        if not self.closed:
            reset(self.transport)

    cdef pause(self):
        if not self.closed:
            self.transport.pause_reading()

    cdef resume(self):
        if not self.closed:
            self.transport.resume_reading()

    cdef tunnel_to(self, transport):
        self.sink = None
        self.tunnel = transport

    cdef pool(self, double now):
        """Back to its target's pool as the warmest idle connection."""
        self.target.put(self, now)
