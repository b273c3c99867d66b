# HOT PATH, included by fastgate/_http.pyx: the built-in stages of the decision
# pipeline and the upstream request head. fastgate/pipeline.py names the
# stages, documents the contract and compiles them per route; a stage written
# in Python subclasses Stage and overrides run() (cpdef: a Cython stage is a C
# call, a Python one a normal method call).

from urllib.parse import unquote_to_bytes as _unquote_to_bytes

from fastgate import core as _core
from fastgate.server.http1 import double_encoded as _double_encoded

cdef bytes _WWW_AUTH = b'www-authenticate: Bearer realm="fastgate"\r\n'
cdef object _CONFLICT = object()
_KEY_MESSAGES = {
    _core.NO_SUCH_KEY: "API key not recognised",
    _core.KEY_MALFORMED: "API key is malformed or fails its checksum",
    _core.KEY_REVOKED: "API key has been revoked",
    _core.KEY_DISABLED: "API key is disabled",
    _core.KEY_EXPIRED: "API key has expired",
    _core.KEY_NOT_YET_VALID: "API key is not valid yet",
    _core.SCOPE_DENIED: "API key may not call this method on this path",
    _core.KEY_IP_DENIED: "API key may not be used from this address",
    _core.KEY_BUSY: "key table is being written; retry",
}
cdef int64_t _SCOPE_DENIED = _core.SCOPE_DENIED
cdef int64_t _KEY_IP_DENIED = _core.KEY_IP_DENIED
cdef int64_t _UNLIMITED = _core.UNLIMITED
cdef int64_t _RATE_TABLE_FULL = _core.RATE_TABLE_FULL
cdef int64_t _RATE_LIMITED = _core.RATE_LIMITED
cdef dict _ERROR_CODE = _core.ERROR_CODE
cdef object _method_bit = _core.method_bit


cdef inline int64_t _now_ms() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)  # expiry and rate windows are wall-clock
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cpdef bytes rate_headers(rt, bytes policy):
    """RateLimit-* (IETF httpapi draft) and X-RateLimit-*, formatted in C."""
    cdef long long reset = -(-(<long long>rt.reset_ms) // 1000)
    return _rate_fields(rt.limit, rt.remaining, reset, policy)


cdef bytes _rate_fields(long long limit, long long remaining, long long reset, bytes policy):
    _ob_reset()
    _ob_bytes(b"ratelimit-limit: ")
    _ob_int(limit)
    _ob_bytes(b"\r\nratelimit-remaining: ")
    _ob_int(remaining)
    _ob_bytes(b"\r\nratelimit-reset: ")
    _ob_int(reset)
    _ob_bytes(b"\r\n")
    _ob_bytes(policy)
    _ob_bytes(b"x-ratelimit-limit: ")
    _ob_int(limit)
    _ob_bytes(b"\r\nx-ratelimit-remaining: ")
    _ob_int(remaining)
    _ob_bytes(b"\r\nx-ratelimit-reset: ")
    _ob_int(reset)
    _ob_bytes(b"\r\n")
    return _ob_take()


cdef rate_limited(Exchange ex, rt, int64_t r, bytes policy):
    if r == _RATE_TABLE_FULL:
        ex.reply("rate_limited", "rate-limit table is full; try again later", b"retry-after: 1\r\n")
        return
    cdef int64_t retry = max(1, -(-rt.retry_after_ms // 1000))
    ex.reply("rate_limited", "rate limit exceeded", b"retry-after: %d\r\n" % retry
                        + rate_headers(rt, policy))


cdef inline bytes _packed_client(Exchange ex):
    cdef ClientConnection conn = ex.conn
    client = ex.d.client
    return conn.peer_packed if client is conn.peer else _pack_ip(client)


cdef class Stage:
    """The contract: build(route, worker) at config time (None: the route does
    not use the stage), run(ex) per request (True: go on; False: answered)."""

    name = ""
    cdef public object w
    cdef public object route

    def __init__(self, route, w):
        self.route = route
        self.w = w

    @classmethod
    def build(cls, route, w):
        return cls(route, w)

    cpdef bint run(self, Exchange ex) except -1:
        raise NotImplementedError


cdef class ClientIp(Stage):
    """The client address: the peer, or X-Forwarded-For walked right to left
    while the hops are trusted proxies."""

    name = "client_ip"
    cdef object ip

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.ip = w.ip

    cpdef bint run(self, Exchange ex) except -1:
        cdef ClientConnection conn = ex.conn
        ex.d.client = self.ip.client_ip(conn.peer, True, ex.head.xff) if conn.trusted else conn.peer
        return True


cdef class IpRules(Stage):
    name = "ip"
    cdef object ip

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.ip = w.ip

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if w.ip.active else None

    cpdef bint run(self, Exchange ex) except -1:
        if self.ip.denied(ex.d.client):
            ex.reply("ip_denied", "client address is not allowed")
            return False
        return True


cdef class BodyLimit(Stage):
    name = "limits"
    cdef int64_t max_body

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.max_body = route.max_body

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.max_body < (1 << 62) else None

    cpdef bint run(self, Exchange ex) except -1:
        cdef int64_t mb = self.max_body
        if ex.head.length > mb or ex.body_seen > mb:
            ex.reply("body_too_large", f"request body exceeds {mb} bytes")
            return False
        return True


cdef class KeyCredential(Stage):
    """The API key: from the configured header, Authorization: Bearer, or an
    opted-in query parameter; removed from what the upstream sees. One core
    call checks it, its scopes and CIDRs; its limits are counted right after.
    Failed checks count towards the address's failed-auth limit; only the
    failures beyond it get 429, so a valid key is never locked out."""

    name = "key"
    cdef object keys
    cdef object rates
    cdef bytes param
    cdef dict bits
    cdef object admission
    cdef dict idcache

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.admission = w.admission
        self.idcache = w.idcache
        self.keys = w.keys
        self.rates = w.rates
        self.param = route.key_query_param
        self.bits = w.method_bits

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    cpdef bint run(self, Exchange ex) except -1:
        cdef Decision d = ex.d
        key = self.take_key(ex)
        if key is None:
            ex.reply("key_missing", "this route needs an API key", _WWW_AUTH)
            return False
        if key is _CONFLICT:
            ex.reply("bad_request", "the request carries two different API keys")
            return False
        cdef bytes packed = _packed_client(ex)
        cdef int64_t now_ms = _now_ms()
        method = d.authz_method
        bit = self.bits.get(method)
        if bit is None:
            bit = _method_bit(method)
        # key + scope + key CIDRs + rate limits: one call into the core
        adm = self.admission
        cdef int64_t st = self.rates.admit(self.keys, key, bit, ex.path, packed, now_ms, adm)
        cdef int64_t idx
        if st >= 0 or st == _RATE_LIMITED:
            idx = st if st >= 0 else adm.index
            gen = adm.generation
            ident = self.idcache.get(idx)
            if ident is None or (<tuple>ident)[3] != gen:
                ident = self.w.identity(idx, gen)
            d.verdict = idx
            d.identity = ident[0]
            d.key = ident[4]
            d.key_index = idx
            d.rate = adm.rate  # the rate stage answers from it (the core left its fields set)
            d.policy = ident[2]
            return True
        idx = st
        d.verdict = idx
        if idx == _SCOPE_DENIED or idx == _KEY_IP_DENIED:
            return True  # the scope stage answers
        code = _ERROR_CODE.get(idx, "key_invalid")
        if code == "key_invalid" and self.w.failed_auth(packed, now_ms):
            retry = max(1, -(-self.rates.retry_after_ms // 1000))
            ex.reply("rate_limited", "too many failed key checks from this address",
                             b"retry-after: %d\r\n" % retry)
            return False
        ex.reply(code, _KEY_MESSAGES.get(idx, "API key refused"),
                         _WWW_AUTH if code == "key_invalid" or code == "key_expired" else
                         b"retry-after: 1\r\n" if code == "overloaded" else b"")
        return False

    cdef object take_key(self, Exchange ex):
        """The key the parser found (the key header or Authorization: Bearer,
        which are then not forwarded), or an opted-in query parameter."""
        cdef Head h = ex.head
        cdef Decision d = ex.d
        if h.key_conflict:
            return _CONFLICT
        cdef object found = h.key
        if h.has_key_field:
            d.take_key = True
        param = self.param
        if param and d.query:
            rest = []
            for part in d.query[1:].split(b"&"):
                name, _, value = part.partition(b"=")
                if name == param:
                    cand = _unquote_to_bytes(value)
                    if found is not None and cand != found:
                        return _CONFLICT
                    found = cand
                else:
                    rest.append(part)
            d.query = b"?" + b"&".join(rest) if rest else b""
        return found


cdef class KeyScope(Stage):
    name = "scope"

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    cpdef bint run(self, Exchange ex) except -1:
        cdef int64_t v = ex.d.verdict
        if v >= 0:
            return True
        ex.reply(_ERROR_CODE[v], _KEY_MESSAGES[v])
        return False


cdef class KeyRate(Stage):
    name = "rate"
    cdef object rates

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.rates = w.rates

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    cpdef bint run(self, Exchange ex) except -1:
        cdef Decision d = ex.d
        cdef int64_t r = d.rate
        if r == _UNLIMITED:
            return True
        if r < 0:
            rate_limited(ex, self.rates, r, d.policy)
            return False
        d.resp_extra = rate_headers(self.rates, d.policy)
        return True


cdef class AddressRate(Stage):
    """Per-address limits on an open route (ip_limits)."""

    name = "rate"
    cdef object rates
    cdef object policy
    cdef bytes header

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.rates = w.rates
        self.policy = route.ip_policy
        self.header = route.ip_policy_header

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth != "key" and route.ip_policy is not None else None

    cpdef bint run(self, Exchange ex) except -1:
        rt = self.rates
        cdef int64_t r = rt.hit(self.policy, self.w.addr_subject(_packed_client(ex)), _now_ms())
        if r == _UNLIMITED:
            return True
        if r < 0:
            rate_limited(ex, rt, r, self.header)
            return False
        ex.d.resp_extra = rate_headers(rt, self.header)
        return True


cdef class Rewrite(Stage):
    """What the upstream request becomes: the path with the route's prefix
    stripped (strip_path), and the method-override field on routes that honour it."""

    name = "rewrite"
    cdef bytes prefix
    cdef bint strip
    cdef bint override

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.prefix = route.prefix
        self.strip = route.strip_path and route.prefix != b"/"
        self.override = route.method_override

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if (route.strip_path and route.prefix != b"/") or route.method_override else None

    cpdef bint run(self, Exchange ex) except -1:
        cdef bytes path
        cdef Decision d = ex.d
        if self.strip:
            path = ex.path[len(self.prefix):] or b"/"
            d.up_path = path if path[:1] == b"/" else b"/" + path
        line = ex.head.method_override_line
        if line is not None and self.override:
            d.add_fields = d.add_fields + line
        return True


cdef class Upstream(Stage):
    """The end of admission: choose the target and hand over to the upstream side."""

    name = "upstream"
    cdef object upstream
    cdef object only   # the one target of a single-target upstream (compiled again on reload)

    def __init__(self, route, w):
        Stage.__init__(self, route, w)
        self.upstream = route.upstream
        targets = route.upstream.targets
        self.only = targets[0] if len(targets) == 1 else None

    cpdef bint run(self, Exchange ex) except -1:
        proxy(self.w, ex, self.only if self.only is not None else self.upstream.next_target())
        return True


cpdef bytes host_name(bytes authority):
    """The host of a validated authority, lower-cased, without its port."""
    if authority[:1] == b"[":
        return authority[: authority.find(b"]") + 1].lower()
    return authority.split(b":", 1)[0].lower()


cdef inline object _walk(dict table, bytes path):
    """Router._walk in C: the longest prefix of path, on segment boundaries."""
    cdef PyObject *r
    cdef bytes p = path
    cdef Py_ssize_t i
    while True:
        r = PyDict_GetItem(table, p)
        if r != NULL:
            return <object>r
        i = p.rfind(b"/")
        if i <= 0:
            r = PyDict_GetItem(table, b"/")
            return None if r == NULL else <object>r
        p = p[:i]


cdef object _route_match(router, bytes host, bytes path):
    """Router.match in C (host routes win over host-less ones)."""
    cdef dict by_host = router.by_host
    cdef dict any_host = router.any_host
    cdef PyObject *t
    if by_host and host:
        t = PyDict_GetItem(by_host, host_name(host))
        if t != NULL:
            r = _walk(<dict>t, path)
            if r is not None:
                return r
    if any_host:
        return _walk(any_host, path)
    return None


cdef inline bint _has_pct25(bytes path) noexcept:
    """'%25' in path, without bytes.__contains__ (a buffer and a search setup: ~2k instructions)."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(path)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path), i
    for i in range(n - 2):
        if p[i] == 37 and p[i + 1] == 50 and p[i + 2] == 53:
            return True
    return False


cdef object route_stage(w, Exchange ex):
    """Stage 'route': host + longest prefix + methods, with the method a route
    that honours method override checks instead. None: answered."""
    cdef Head h = ex.head
    cdef Decision d = ex.d
    route = _route_match(w.router, h.host, ex.path)
    if route is None:
        ex.reply("no_route", "no route matches this host and path")
        return None
    d.route = route
    if route.reject_double_encoding and _has_pct25(ex.path) and _double_encoded(ex.path):
        ex.reply("bad_request", "double-encoded '.', '/' or '\\' in the path")
        return None
    method = h.method
    if route.method_override:
        override = h.method_override
        if override is not None:
            method = override.strip()
            if method not in w.method_bits:
                ex.reply("bad_request", "method override names no known method")
                return None
    d.authz_method = method
    methods = route.methods
    if methods is not None and method not in methods:
        ex.reply("method_not_allowed", "method not allowed on this route", route.allow_header)
        return None
    return route


cpdef handle(w, Exchange ex):
    """Run one request through the pipeline (the parse stage has run)."""
    route = route_stage(w, ex)
    if route is None:
        return
    cdef Stage stage
    for stage in route.stages:
        if not stage.run(ex):
            return


# -- the upstream request ---------------------------------------------------------------

cpdef proxy(w, Exchange ex, target):
    """The end of admission. A body up to request_buffer is read whole before
    the upstream is chosen; a larger one streams from here."""
    ex.d.target = target
    if ex.admitted():
        send(w, ex)


cpdef send(w, Exchange ex):
    cdef Target target = ex.d.target
    cdef UpstreamConn up = None
    cdef list c = target.counts  # [connects, reuses, connect errors]
    if ex.head.upgrade is None:
        up = target.get()
    if up is not None:
        c[1] = c[1] + 1
        ex.send(up, build_head(w, ex, target))
        return
    w.connect(ex, target)


cpdef bytes build_head(w, Exchange ex, Target target):
    """The upstream request head, copied into the output buffer in one pass."""
    cdef ClientConnection conn = ex.conn
    cdef Decision d = ex.d
    route = d.route
    cdef bytes path = d.up_path or ex.path
    cdef bytes peer = conn.peer_text
    cdef bint trusted = conn.trusted
    cdef Head h = ex.head
    cdef bytes host = h.host or b""
    cdef bytes proto = h.xfp if trusted and h.xfp else b"http"
    _ob_reset()
    _ob_bytes(h.method)
    _ob_bytes(b" ")
    _ob_bytes(path)
    _ob_bytes(d.query)
    _ob_bytes(b" HTTP/1.1\r\nhost: ")
    _ob_bytes(host if route.preserve_host and host else target.host_header)
    _ob_bytes(b"\r\n")
    h.put_fields(d.take_key)
    if d.add_fields:
        _ob_bytes(d.add_fields)
    if d.identity:
        _ob_bytes(d.identity)
    _ob_bytes(b"x-forwarded-for: ")
    if trusted and h.xff:
        _ob_bytes(h.xff)
        _ob_bytes(b", ")
    _ob_bytes(peer)
    _ob_bytes(b"\r\nx-forwarded-proto: ")
    _ob_bytes(proto)
    _ob_bytes(b"\r\nx-forwarded-host: ")
    _ob_bytes(h.xfh if trusted and h.xfh else host)
    _ob_bytes(b"\r\nx-request-id: ")
    _ob_bytes(ex.rid)
    _ob_bytes(b"\r\n")
    if w.forwarded_header:
        _ob_bytes(forwarded_element(conn.peer, host, proto))
    if h.chunked:
        if ex.body_done:
            # read and validated whole: the upstream gets it with a length,
            # as nginx sends a buffered body (Exchange.send frames it the same way)
            _ob_bytes(b"content-length: ")
            _ob_int(ex.body_seen)
            _ob_bytes(b"\r\n")
        else:
            _ob_bytes(b"transfer-encoding: chunked\r\n")
    elif h.length >= 0:
        _ob_bytes(b"content-length: ")
        _ob_int(h.length)
        _ob_bytes(b"\r\n")
    if h.upgrade is not None:
        _ob_bytes(b"connection: upgrade\r\nupgrade: ")
        _ob_bytes(h.upgrade)
        _ob_bytes(b"\r\n")
    _ob_bytes(b"\r\n")
    return _ob_take()


cpdef bytes forwarded_element(str peer, bytes host, bytes proto):
    """An RFC 7239 Forwarded field for this hop."""
    node = f'"[{peer}]"' if ":" in peer else peer
    cdef bytes out = b"forwarded: for=%s;proto=%s" % (node.encode(), proto)
    if host:
        out += b';host="%s"' % host if b":" in host else b";host=%s" % host
    return out + b"\r\n"
