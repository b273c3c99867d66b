# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""HOT PATH: fastgate's own strict HTTP/1.1 request parser.

One ``RequestParser`` per client connection. ``feed(data)`` parses everything
the read holds -- request heads, bodies (Content-Length or chunked), pipelined
requests -- and returns a flat list of events ``[kind, value, kind, value...]``:

    EV_HEAD     a ``Head``: method, path, query, host, framing, the fields to
                forward (already filtered), keep-alive, upgrade ...
    EV_BODY     decoded body bytes (chunk framing removed)
    EV_END      the body of the current message is complete
    EV_UPGRADE  bytes after the head of an accepted WebSocket upgrade: the
                parser stops there and never parses this connection again
    EV_ERROR    ``(code, message, seq)``: the input is refused; ``seq`` is the
                Head.seq of the message it belongs to (or the next seq when the
                head itself was refused). Always the last event; the parser is
                dead afterwards.

Because a whole read is parsed before the caller acts on any event, a framing
error anywhere in the bytes that arrived with a head is known before a single
byte of that request can go upstream.

The grammar is RFC 9112 with every leniency removed: CRLF only (a bare CR or
LF is an error), no obs-fold, no whitespace before a colon, token names, no
control characters in values, exactly one Host (an authority and nothing
else), at most one Content-Length (digits only), Transfer-Encoding only as a
single ``chunked`` and never with Content-Length or in HTTP/1.0, a chunk
grammar without whitespace, signs, prefixes or overflow, bounded chunk
extensions, and trailers that obey the field rules, are bounded, and may not
carry framing. Trailers are validated and dropped: they never reach the
upstream and never become headers.

Field filtering happens here too, once per field, in C: hop-by-hop and framing
fields, fields the gateway sets itself (x-forwarded-*, x-request-id,
x-fastgate-*), method-override and URL-override fields, client-address fields
from an untrusted peer, and field names with an underscore (nginx's
``underscores_in_headers off``) never appear in ``Head.headers``.

No code from llhttp or any other parser is copied here; httptools serves only
as the test oracle for valid input (tests/unit/test_parser.py).
"""

cimport cython
from libc.stdint cimport uint8_t, int32_t, int64_t, uint64_t
from libc.stdlib cimport realloc
from libc.string cimport memchr, memcpy, memcmp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef extern from "sys/socket.h" nogil:
    int AF_INET6

EV_HEAD = 1
EV_BODY = 2
EV_END = 3
EV_UPGRADE = 4
EV_ERROR = 5

# -------------------------------------------------------------- character classes

cdef uint8_t C_TCHAR = 1      # RFC 9110 token
cdef uint8_t C_VALUE = 2      # field-vchar / SP / HTAB / obs-text
cdef uint8_t C_TARGET = 4     # request-target: visible ASCII except '#'
cdef uint8_t C_HEX = 8
cdef uint8_t C_REGNAME = 16   # unreserved: ALPHA DIGIT - . _ ~
cdef uint8_t C_QDTEXT = 32    # quoted-string text (no '"' or '\')
cdef uint8_t C_METHOD = 64    # methods: upper-case letters, '-' and '_' (as nginx)

cdef uint8_t CLS[256]
cdef uint8_t LOWER[256]
cdef int _i
for _i in range(256):
    CLS[_i] = 0
    LOWER[_i] = _i + 32 if 65 <= _i <= 90 else _i
for _i in range(0x21, 0x7F):
    CLS[_i] |= C_VALUE | C_TARGET
    if _i != 0x22 and _i != 0x5C:
        CLS[_i] |= C_QDTEXT
for _i in (0x09, 0x20):
    CLS[_i] |= C_VALUE | C_QDTEXT
for _i in range(0x80, 0x100):
    CLS[_i] |= C_VALUE | C_QDTEXT
CLS[0x23] &= ~C_TARGET  # '#': a fragment is never sent in a request
for _c in list(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"):
    CLS[_c] |= C_TCHAR
for _c in list(b"0123456789abcdefABCDEF"):
    CLS[_c] |= C_HEX
for _c in list(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"):
    CLS[_c] |= C_REGNAME
for _c in list(b"-_ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    CLS[_c] |= C_METHOD

cdef inline int _hexval(uint8_t c) noexcept nogil:
    if c <= 57:
        return c - 48
    return (c | 32) - 87

# ------------------------------------------------------------------ field classes

cdef enum:
    F_PLAIN = 0         # forwarded as it came
    F_HOST = 1
    F_CL = 2
    F_TE = 3
    F_CONNECTION = 4
    F_UPGRADE = 5
    F_EXPECT = 6
    F_XFF = 7
    F_RID = 8
    F_HOP = 9           # hop-by-hop or set by the gateway: dropped
    F_OVERRIDE = 10     # method override: dropped, value kept for opted-in routes
    F_CLIENT_ADDR = 11  # dropped unless the peer is a trusted proxy
    F_XFP = 12          # X-Forwarded-Proto: kept only from a trusted proxy
    F_XFH = 13          # X-Forwarded-Host: kept only from a trusted proxy

_FIELDS = {
    b"host": F_HOST,
    b"content-length": F_CL,
    b"transfer-encoding": F_TE,
    b"connection": F_CONNECTION,
    b"upgrade": F_UPGRADE,
    b"expect": F_EXPECT,
    b"x-forwarded-for": F_XFF,
    b"x-request-id": F_RID,
    b"keep-alive": F_HOP,
    b"proxy-connection": F_HOP,
    b"te": F_HOP,
    b"trailer": F_HOP,
    b"x-forwarded-proto": F_XFP,
    b"x-forwarded-host": F_XFH,
    b"x-original-url": F_HOP,
    b"x-rewrite-url": F_HOP,
    b"x-http-method-override": F_OVERRIDE,
    b"x-http-method": F_OVERRIDE,
    b"x-method-override": F_OVERRIDE,
    b"x-real-ip": F_CLIENT_ADDR,
    b"forwarded": F_CLIENT_ADDR,
    b"x-client-ip": F_CLIENT_ADDR,
    b"true-client-ip": F_CLIENT_ADDR,
    b"cf-connecting-ip": F_CLIENT_ADDR,
    b"x-cluster-client-ip": F_CLIENT_ADDR,
    b"fastly-client-ip": F_CLIENT_ADDR,
    b"x-forwarded-port": F_CLIENT_ADDR,
    b"x-forwarded-prefix": F_CLIENT_ADDR,
}
FIELD_NAMES = frozenset(_FIELDS)

# The same table for C: a field name is classified by comparing its bytes in
# place, without making a Python object of it.
DEF MAX_KNOWN = 64
cdef const uint8_t *_kn_name[MAX_KNOWN]
cdef Py_ssize_t _kn_len[MAX_KNOWN]
cdef int _kn_id[MAX_KNOWN]
cdef int _nkn = 0
cdef list _kn_keep = []
for _name, _fid in _FIELDS.items():
    assert _nkn < MAX_KNOWN
    _kn_keep.append(_name)
    _kn_name[_nkn] = <const uint8_t *>PyBytes_AS_STRING(_name)
    _kn_len[_nkn] = len(_name)
    _kn_id[_nkn] = _fid
    _nkn += 1


cdef inline bint _name_is(const uint8_t *p, Py_ssize_t n, const uint8_t *lit, Py_ssize_t m,
                          bint alias) noexcept:
    """Case-insensitive equality with a lower-case name; alias: '_' counts as '-'."""
    cdef Py_ssize_t i
    cdef uint8_t c
    if n != m:
        return False
    for i in range(n):
        c = LOWER[p[i]]
        if alias and c == 95:
            c = 45
        if c != lit[i]:
            return False
    return True


cdef inline int _known(const uint8_t *p, Py_ssize_t n, bint alias) noexcept:
    """F_* of a field we manage, or -1."""
    cdef int i
    for i in range(_nkn):
        if _kn_len[i] == n and _name_is(p, n, _kn_name[i], n, alias):
            return _kn_id[i]
    return -1


# Forwarded fields are kept as spans into Head.raw: one copy of the head, no
# object per field. Head.headers builds tuples on demand (tests, Python stages).
cdef struct _Span:
    int32_t off        # the field line, from the start of Head.raw
    int32_t name_len
    int32_t v0         # the value, from the start of Head.raw (OWS trimmed)
    int32_t vlen
    int32_t flags

DEF FL_KEY = 1         # the key header, or Authorization: Bearer (the key stage removes it)
DEF FL_CONN = 2        # named in Connection: hop-by-hop, never forwarded

# The spans of the head being parsed (one parser runs at a time per process).
cdef _Span *_scratch = NULL
cdef Py_ssize_t _scratch_cap = 0


cdef int _scratch_reserve(Py_ssize_t n) except -1:
    global _scratch, _scratch_cap
    cdef Py_ssize_t cap
    cdef _Span *p
    if n <= _scratch_cap:
        return 0
    cap = max(n, 2 * _scratch_cap, 64)
    p = <_Span *>realloc(_scratch, cap * sizeof(_Span))
    if p == NULL:
        raise MemoryError()
    _scratch = p
    _scratch_cap = cap
    return 0

# ------------------------------------------------------------------ errors

cdef object E_BAD = "bad_request"
cdef object E_HEADERS = "headers_too_large"
cdef object E_URI = "uri_too_long"
cdef object E_VERSION = "http_version_not_supported"
cdef object E_UPGRADE = "upgrade_refused"


@cython.freelist(64)
cdef class Head:
    """One parsed request head. Read-only for Python."""
    cdef readonly bytes method
    cdef readonly bytes path          # raw path of the target (not normalised)
    cdef readonly bytes query         # b"" or b"?..."
    cdef readonly bytes host          # the validated authority, or None (HTTP/1.0 only)
    cdef readonly bint absolute       # absolute-form target (its authority is host)
    cdef readonly int version         # 10 or 11
    cdef readonly bytes raw           # the head as received, from the request line to the empty line
    cdef bytes spans                  # _Span[nspans]: the fields to forward, in order
    cdef readonly int nspans
    cdef readonly bytes key           # the API key it carries (first key field), or None
    cdef readonly bint key_conflict   # its key fields disagree
    cdef readonly bint has_key_field  # a key field is among the spans (forwarded unless taken)
    cdef readonly int64_t length      # Content-Length, or -1
    cdef readonly bint chunked
    cdef readonly bint keep_alive
    cdef readonly bint expect_continue
    cdef readonly bytes upgrade       # b"websocket" for an accepted upgrade, else None
    cdef readonly bytes xff           # X-Forwarded-For values joined, or None
    cdef readonly bytes xfp           # X-Forwarded-Proto from a trusted proxy, or None
    cdef readonly bytes xfh           # X-Forwarded-Host from a trusted proxy, or None
    cdef readonly bytes request_id    # X-Request-ID as sent, or None
    cdef readonly bytes method_override        # the first method-override field's value
    cdef readonly bytes method_override_line   # that field as a line to forward ("Name: value\r\n")
    cdef readonly list conn_tokens    # other tokens named in Connection, or None
    cdef readonly int nfields         # field lines in the head
    cdef readonly int seq             # 1, 2, ... per connection

    @property
    def has_body(self):
        return self.chunked or self.length > 0

    @property
    def headers(self):
        """[(lower-case name, name, value)] of the fields to forward (built on demand)."""
        cdef const char *raw = PyBytes_AS_STRING(self.raw) if self.nspans else NULL
        cdef const _Span *sp = <const _Span *>PyBytes_AS_STRING(self.spans) if self.nspans else NULL
        cdef int i
        out = []
        for i in range(self.nspans):
            name = PyBytes_FromStringAndSize(raw + sp[i].off, sp[i].name_len)
            out.append((name.lower(), name, PyBytes_FromStringAndSize(raw + sp[i].v0, sp[i].vlen)))
        return out

    cdef int put_fields(self, bint take_key) except -1:
        """The forwarded fields into the output buffer, "name: value" each."""
        if not self.nspans:
            return 0
        cdef const char *raw = PyBytes_AS_STRING(self.raw)
        cdef const _Span *sp = <const _Span *>PyBytes_AS_STRING(self.spans)
        cdef int i, drop = FL_CONN | (FL_KEY if take_key else 0)
        for i in range(self.nspans):
            if sp[i].flags & drop:
                continue
            _ob_put(raw + sp[i].off, sp[i].name_len)
            _ob_put(": ", 2)
            _ob_put(raw + sp[i].v0, sp[i].vlen)
            _ob_put("\r\n", 2)
        return 0

    @property
    def version_str(self):
        return "1.1" if self.version == 11 else "1.0"


# parser states
cdef enum:
    S_HEAD = 0
    S_LENGTH = 1
    S_CSIZE = 2         # chunk-size digits
    S_CEXT = 3          # inside chunk extensions
    S_CSIZE_LF = 4
    S_CDATA = 5
    S_CDATA_CR = 6
    S_CDATA_LF = 7
    S_TRAILER = 8       # at the start of a trailer line
    S_TNAME = 9
    S_TVALUE = 10
    S_TVALUE_LF = 11
    S_TEND_LF = 12
    S_UPGRADED = 13
    S_DEAD = 14
    S_CLOSED = 15       # after a message that ends the connection: input is ignored
    S_IDLE = 16         # response side: no request outstanding, so no byte may arrive
    S_UNTIL_CLOSE = 17  # response side: a body that ends when the upstream closes

# chunk-extension sub-states
cdef enum:
    X_END = -1     # the CR that ends the chunk line was seen
    X_NAME0 = 0    # right after ';': a name must start
    X_NAME = 1
    X_VAL0 = 2     # right after '='
    X_VTOKEN = 3
    X_QUOTED = 4
    X_QESC = 5
    X_AFTERQ = 6   # after a closing quote: ';' or CR

DEF MAX_METHOD = 32
DEF MAX_LEADING_EMPTY = 8
DEF MAX_CHUNK_DIGITS = 16
DEF CHUNK_SIZE_MAX = 0x3FFFFFFFFFFFFFFF
DEF REQUEST_LINE_SLACK = 64   # method, spaces and version beside the target


cdef class _Body:
    """The body decoder both parsers share: Content-Length counting and the
    strict chunked grammar (with its trailer rules). Subclasses parse heads."""

    cdef Py_ssize_t max_ext           # bytes of extensions per chunk line
    cdef int max_trailers
    cdef Py_ssize_t max_trailer_bytes
    cdef int state
    cdef int after                    # state once the current message ends
    cdef readonly object error        # (code, message) once dead
    cdef object bad                   # the error code for a malformed body
    cdef object too_big               # the error code for a body part over its limit
    # the body being decoded
    cdef int64_t remaining
    cdef int ndigits
    cdef int xstate
    cdef Py_ssize_t ext_len
    cdef int ntrailers
    cdef Py_ssize_t trailer_bytes
    cdef Py_ssize_t tname_len
    cdef uint8_t tname[24]

    cdef inline void _start_chunked(self) noexcept:
        self.state = S_CSIZE
        self.ndigits = 0
        self.remaining = 0
        self.ntrailers = 0
        self.trailer_bytes = 0

    cdef int _err(self, code, message) except -1:
        self.error = (code, message)
        return 0

    # -- chunked bodies ---------------------------------------------------------------
    cdef Py_ssize_t _chunked(self, list ev, const uint8_t *p, Py_ssize_t i, Py_ssize_t n) except -3:
        """Decode p[i:n]; returns the offset reached, or -1 on a framing error."""
        cdef uint8_t c
        cdef int st = self.state
        cdef Py_ssize_t take
        while i < n:
            if st == S_CDATA:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                ev.append(EV_BODY)
                ev.append(PyBytes_FromStringAndSize(<const char *>p + i, take))
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    st = S_CDATA_CR
                continue
            c = p[i]
            if st == S_CSIZE:
                if CLS[c] & C_HEX:
                    self.ndigits += 1
                    if self.ndigits > MAX_CHUNK_DIGITS or self.remaining > (CHUNK_SIZE_MAX >> 4):
                        return self._cfail(st, self.bad, "chunk size is too large")
                    self.remaining = self.remaining * 16 + _hexval(c)
                elif self.ndigits and c == 59:  # ';'
                    st = S_CEXT
                    self.xstate = X_NAME0
                    self.ext_len = 0
                elif self.ndigits and c == 13:
                    st = S_CSIZE_LF
                else:
                    return self._cfail(st, self.bad, "invalid chunk size")
            elif st == S_CEXT:
                self.ext_len += 1
                if self.ext_len > self.max_ext:
                    return self._cfail(st, self.bad, "chunk extensions exceed the size limit")
                if not self._ext(c):
                    return self._cfail(st, self.bad, "invalid chunk extension")
                if self.xstate == X_END:
                    st = S_CSIZE_LF
            elif st == S_CSIZE_LF:
                if c != 10:
                    return self._cfail(st, self.bad, "bare CR in a chunk size line")
                st = S_TRAILER if self.remaining == 0 else S_CDATA
            elif st == S_CDATA_CR:
                if c != 13:
                    return self._cfail(st, self.bad, "chunk data is longer than its size or lacks its CRLF")
                st = S_CDATA_LF
            elif st == S_CDATA_LF:
                if c != 10:
                    return self._cfail(st, self.bad, "bare CR after chunk data")
                st = S_CSIZE
                self.ndigits = 0
                self.remaining = 0
            elif st == S_TRAILER:
                if c == 13:
                    st = S_TEND_LF
                elif CLS[c] & C_TCHAR:
                    self.ntrailers += 1
                    if self.ntrailers > self.max_trailers:
                        return self._cfail(st, self.too_big, "too many trailer fields")
                    st = S_TNAME
                    self.tname_len = 0
                    self._tname_add(c)
                    self.trailer_bytes += 1
                elif c == 32 or c == 9:
                    return self._cfail(st, self.bad, "obsolete line folding in a trailer field")
                else:
                    return self._cfail(st, self.bad, "malformed trailer field")
            elif st == S_TNAME:
                self.trailer_bytes += 1
                if CLS[c] & C_TCHAR:
                    self._tname_add(c)
                elif c == 58:
                    if self._tname_forbidden():
                        return self._cfail(st, self.bad, "framing or routing field in the trailer section")
                    st = S_TVALUE
                elif c == 32 or c == 9:
                    return self._cfail(st, self.bad, "whitespace between a trailer name and its colon")
                else:
                    return self._cfail(st, self.bad, "malformed trailer field name")
            elif st == S_TVALUE:
                self.trailer_bytes += 1
                if c == 13:
                    st = S_TVALUE_LF
                elif not CLS[c] & C_VALUE:
                    return self._cfail(st, self.bad, "control character in a trailer field value")
            elif st == S_TVALUE_LF:
                if c != 10:
                    return self._cfail(st, self.bad, "bare CR in the trailer section")
                st = S_TRAILER
            elif st == S_TEND_LF:
                if c != 10:
                    return self._cfail(st, self.bad, "bare CR at the end of the trailer section")
                ev.append(EV_END)
                ev.append(None)
                self.state = self.after
                return i + 1
            if self.trailer_bytes > self.max_trailer_bytes:
                return self._cfail(st, self.too_big, "trailer section exceeds the size limit")
            i += 1
        self.state = st
        return i

    cdef Py_ssize_t _cfail(self, int st, code, message) except -3:
        self.state = st
        self._err(code, message)
        return -1

    cdef inline void _tname_add(self, uint8_t c) noexcept:
        if self.tname_len < 24:
            self.tname[self.tname_len] = LOWER[c]
        self.tname_len += 1

    cdef bint _tname_forbidden(self) noexcept:
        """Trailers may not carry framing or routing (RFC 9110 §6.5.1); their
        '_' aliases neither."""
        cdef Py_ssize_t n = self.tname_len, i
        cdef uint8_t t[24]
        if n > 24:
            return False
        for i in range(n):
            t[i] = 45 if self.tname[i] == 95 else self.tname[i]
        return (_eqs(t, n, b"content-length") or _eqs(t, n, b"transfer-encoding") or _eqs(t, n, b"host")
                or _eqs(t, n, b"trailer"))

    cdef bint _ext(self, uint8_t c) noexcept:
        """One byte of chunk extensions: *( ";" name [ "=" ( token / quoted-string ) ] )
        with no whitespace anywhere. Sets xstate = X_END at the CR ending them."""
        cdef int x = self.xstate
        if x == X_NAME0:
            if CLS[c] & C_TCHAR:
                self.xstate = X_NAME
                return True
            return False
        if x == X_NAME:
            if CLS[c] & C_TCHAR:
                return True
            if c == 61:  # '='
                self.xstate = X_VAL0
                return True
        elif x == X_VAL0:
            if c == 34:
                self.xstate = X_QUOTED
                return True
            if CLS[c] & C_TCHAR:
                self.xstate = X_VTOKEN
                return True
            return False
        elif x == X_VTOKEN:
            if CLS[c] & C_TCHAR:
                return True
        elif x == X_QUOTED:
            if c == 34:
                self.xstate = X_AFTERQ
                return True
            if c == 92:
                self.xstate = X_QESC
                return True
            return CLS[c] & C_QDTEXT != 0
        elif x == X_QESC:
            if c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80:
                self.xstate = X_QUOTED
                return True
            return False
        # after a complete name, token value or quoted value: ';' or the CR
        if c == 59:
            self.xstate = X_NAME0
            return True
        if c == 13:
            self.xstate = X_END
            return True
        return False



cdef class RequestParser(_Body):
    """Strict HTTP/1.1 request parser; see the module docstring."""

    cdef public bint trusted          # the peer is a trusted proxy (client-address fields kept)
    cdef public bint underscores      # forward field names with '_' (never ones that alias ours)
    cdef Py_ssize_t max_url
    cdef Py_ssize_t max_head          # bytes of field lines (the request line is bounded by max_url)
    cdef int max_fields
    cdef bytes key_header             # lower-case; its '_' alias is always dropped
    cdef int seq                      # Head.seq of the last head produced
    # an unfinished head: its bytes and where scanning resumes (offsets into it)
    cdef bytearray buf
    cdef Py_ssize_t scan_pos
    cdef int nlines                   # non-empty lines seen (1 = the request line)
    cdef int leading                  # empty lines before the request line
    cdef Py_ssize_t line0_start       # where the request line starts
    cdef Py_ssize_t line0_end         # just past its LF
    # request-target errors
    cdef object terr_code
    cdef object terr

    def __init__(self, *, Py_ssize_t max_url=8192, Py_ssize_t max_head=32768, int max_fields=512,
                 Py_ssize_t max_ext=4096, int max_trailers=32, Py_ssize_t max_trailer_bytes=8192,
                 bytes key_header=b"x-api-key", bint trusted=False, bint underscores=False):
        self.max_url = max_url
        self.max_head = max_head
        self.max_fields = max_fields
        self.max_ext = max_ext
        self.max_trailers = max_trailers
        self.max_trailer_bytes = max_trailer_bytes
        self.key_header = key_header.lower()
        self.bad = E_BAD
        self.too_big = E_HEADERS
        self.trusted = trusted
        self.underscores = underscores
        self.state = S_HEAD
        self.after = S_HEAD
        self.seq = 0
        self.error = None
        self.buf = bytearray()
        self._reset_scan()

    def set_key_header(self, bytes name):
        """A reload changed [keys] header: heads parsed from now on look for this one."""
        self.key_header = name.lower()

    cdef inline void _reset_scan(self) noexcept:
        self.scan_pos = 0
        self.nlines = 0
        self.leading = 0
        self.line0_start = 0
        self.line0_end = 0

    # -- state for the connection's timers ---------------------------------------
    @property
    def head_pending(self):
        """Bytes of an unfinished request head are buffered."""
        return self.state == S_HEAD and len(self.buf) > 0

    @property
    def in_body(self):
        return S_LENGTH <= self.state <= S_TEND_LF

    @property
    def dead(self):
        return self.state == S_DEAD

    @property
    def upgraded(self):
        return self.state == S_UPGRADED

    @property
    def closed(self):
        """The last message ends the connection; later input is ignored."""
        return self.state == S_CLOSED

    # -- the one entry point --------------------------------------------------------
    def feed(self, bytes data not None):
        """Parse one read; returns the flat event list (possibly empty)."""
        cdef list ev = []
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0, r, old, take, limit
        cdef int st
        cdef bytes head
        while i < n:
            st = self.state
            if st == S_HEAD:
                if len(self.buf) == 0:
                    r = self._find_end(p + i, n - i)
                    if r == -2:
                        return self._fail(ev, self.seq + 1)
                    if r == -1:
                        # unfinished: keep it (_find_end has bounded it)
                        self.buf += data[i:] if i else data
                        return ev
                    if not self._head(ev, p + i, r):
                        return ev
                    i += r
                else:
                    old = len(self.buf)
                    limit = self.max_url + REQUEST_LINE_SLACK + self.max_head + 2 * MAX_LEADING_EMPTY + 4
                    take = n - i
                    if old + take > limit + 1:
                        take = limit + 1 - old  # enough to trip a limit, never more
                        if take < 0:
                            take = 0
                    self.buf += data[i:i + take]
                    r = self._find_end(<const uint8_t *>(<char *>self.buf), len(self.buf))
                    if r == -2:
                        return self._fail(ev, self.seq + 1)
                    if r == -1:
                        return ev
                    # the end cannot lie in what earlier reads brought (they were
                    # scanned), so r > old: this read supplied r - old of the head
                    head = bytes(self.buf[:r])
                    self.buf = bytearray()
                    if not self._head(ev, <const uint8_t *>PyBytes_AS_STRING(head), r):
                        return ev
                    i += r - old
            elif st == S_LENGTH:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                ev.append(EV_BODY)
                ev.append(data if (i == 0 and take == n) else PyBytes_FromStringAndSize(<const char *>p + i, take))
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    ev.append(EV_END)
                    ev.append(None)
                    self.state = self.after
            elif st == S_UPGRADED:
                ev.append(EV_UPGRADE)
                ev.append(data[i:] if i else data)
                return ev
            elif st == S_DEAD or st == S_CLOSED:
                return ev
            else:
                r = self._chunked(ev, p, i, n)
                if r < 0:
                    return self._fail(ev, self.seq)
                i = r
        return ev

    cdef list _fail(self, list ev, int seq):
        self.state = S_DEAD
        self.buf = bytearray()
        ev.append(EV_ERROR)
        ev.append((self.error[0], self.error[1], seq))
        return ev

    # -- finding the end of a head -------------------------------------------------
    cdef Py_ssize_t _find_end(self, const uint8_t *b, Py_ssize_t n) except -3:
        """Offset just past the empty line that ends the head in b[:n]; -1 if it
        has not arrived; -2 on a limit or a malformed line end (self.error set).
        Resumable: b must start where the previous call's b started."""
        cdef Py_ssize_t pos = self.scan_pos, eol
        cdef const uint8_t *q
        while True:
            q = <const uint8_t *>memchr(b + pos, 10, n - pos)
            if q == NULL:
                # bound the line still arriving
                if self.nlines == 0:
                    if n - self.line0_start > self.max_url + REQUEST_LINE_SLACK:
                        self._err(E_URI, "request line exceeds the URL length limit")
                        return -2
                elif n - self.line0_end > self.max_head:
                    self._err(E_HEADERS, "request head exceeds the size limit")
                    return -2
                return -1
            eol = q - b
            if eol == pos:
                self._err(E_BAD, "bare LF in the request head")
                return -2
            if eol == pos + 1 and b[pos] == 13:  # an empty line
                if self.nlines == 0:
                    # empty lines before a request line are ignored (RFC 9112 §2.2)
                    self.leading += 1
                    if self.leading > MAX_LEADING_EMPTY:
                        self._err(E_BAD, "too many empty lines before the request line")
                        return -2
                    self.line0_start = eol + 1
                else:
                    self.scan_pos = 0  # the caller reads line0_start before _reset_scan
                    return eol + 1
            elif self.nlines == 0:
                self.line0_end = eol + 1
                if eol + 1 - self.line0_start > self.max_url + REQUEST_LINE_SLACK:
                    self._err(E_URI, "request line exceeds the URL length limit")
                    return -2
                self.nlines = 1
            else:
                self.nlines += 1
                if eol + 1 - self.line0_end > self.max_head:
                    self._err(E_HEADERS, "request head exceeds the size limit")
                    return -2
            pos = eol + 1
            self.scan_pos = pos

    # -- one complete head ------------------------------------------------------------
    cdef bint _head(self, list ev, const uint8_t *b, Py_ssize_t n) except -1:
        """Parse the head in b[line0_start:n] (it ends with CRLF CRLF). True: go
        on with its body or the next request; False: refused (error appended)."""
        cdef Head h = Head.__new__(Head)
        cdef Py_ssize_t pos = self.line0_start, eol, j, k, name_end, v0, v1, t0, t1, tlen, mlen
        cdef const uint8_t *line
        cdef const uint8_t *q
        cdef uint8_t c
        cdef int fid, nfields = 0
        cdef bint has_host = False, has_cl = False, has_te = False, conn_close = False, conn_keep = False
        cdef bint conn_upgrade = False, under, upgrade_ok = False
        cdef int nupgrade = 0
        cdef object value, tok
        cdef Py_ssize_t base = self.line0_start, off
        cdef int nspans = 0, i, override_at = -1
        cdef int32_t flags
        cdef _Span *sp
        cdef bytes kh = self.key_header
        cdef const uint8_t *khp = <const uint8_t *>PyBytes_AS_STRING(kh)
        cdef Py_ssize_t khn = PyBytes_GET_SIZE(kh)
        cdef int64_t cl = -1
        self._reset_scan()
        h.length = -1
        # ---- request line: method SP request-target SP HTTP-version CRLF
        q = <const uint8_t *>memchr(b + pos, 10, n - pos)
        eol = q - b
        if b[eol - 1] != 13:
            return self._refuse(ev, E_BAD, "bare LF in the request head")
        eol -= 1  # at the CR
        line = b + pos
        mlen = 0
        while pos + mlen < eol and CLS[line[mlen]] & C_METHOD:
            mlen += 1
        if mlen == 0 or pos + mlen >= eol or line[mlen] != 32:
            return self._refuse(ev, E_BAD, "malformed request method")
        if mlen > MAX_METHOD:
            return self._refuse(ev, E_BAD, "request method is too long")
        t0 = mlen + 1
        t1 = t0
        while pos + t1 < eol and CLS[line[t1]] & C_TARGET:
            t1 += 1
        tlen = t1 - t0
        if pos + t1 < eol and line[t1] == 35:
            return self._refuse(ev, E_BAD, "request target carries a fragment")
        if tlen == 0 or pos + t1 >= eol or line[t1] != 32:
            return self._refuse(ev, E_BAD, "malformed request target")
        if tlen > self.max_url:
            return self._refuse(ev, E_URI, "request target exceeds the URL length limit")
        k = pos + t1 + 1  # the version, up to the CR
        if eol - k != 8 or b[k] != 72 or b[k + 1] != 84 or b[k + 2] != 84 or b[k + 3] != 80 \
                or b[k + 4] != 47 or b[k + 6] != 46 or not (48 <= b[k + 5] <= 57) or not (48 <= b[k + 7] <= 57):
            return self._refuse(ev, E_BAD, "malformed HTTP version")
        if b[k + 5] == 49 and b[k + 7] == 49:
            h.version = 11
        elif b[k + 5] == 49 and b[k + 7] == 48:
            h.version = 10
        else:
            return self._refuse(ev, E_VERSION, "only HTTP/1.0 and HTTP/1.1 are supported")
        if not self._target(h, line + t0, tlen):
            return self._refuse(ev, self.terr_code, self.terr)
        h.method = PyBytes_FromStringAndSize(<const char *>line, mlen)
        pos = eol + 2
        # ---- field lines, up to the empty line
        while True:
            q = <const uint8_t *>memchr(b + pos, 10, n - pos)
            eol = q - b  # at the LF
            if eol == pos or b[eol - 1] != 13:
                return self._refuse(ev, E_BAD, "bare LF in the request head")
            eol -= 1  # at the CR
            if eol == pos:
                break
            line = b + pos
            v1 = eol - pos  # the CR, relative to line
            nfields += 1
            if nfields > self.max_fields:
                return self._refuse(ev, E_HEADERS, "too many request header fields")
            c = line[0]
            if c == 32 or c == 9:
                return self._refuse(ev, E_BAD, "obsolete line folding in a header field")
            k = 0
            under = False
            while k < v1 and CLS[line[k]] & C_TCHAR:
                if line[k] == 95:
                    under = True
                k += 1
            if k == 0 or k >= v1 or line[k] != 58:
                if k < v1 and (line[k] == 32 or line[k] == 9):
                    return self._refuse(ev, E_BAD, "whitespace between a header name and its colon")
                return self._refuse(ev, E_BAD, "malformed header field name")
            name_end = k
            k += 1
            while k < v1 and (line[k] == 32 or line[k] == 9):
                k += 1
            v0 = k
            while v1 > v0 and (line[v1 - 1] == 32 or line[v1 - 1] == 9):
                v1 -= 1
            for j in range(v0, v1):
                if not CLS[line[j]] & C_VALUE:
                    return self._refuse(ev, E_BAD, "control character in a header field value")
            pos = eol + 2
            fid = self._classify(line, name_end, under)
            if fid < 0:
                continue  # dropped
            if fid == F_PLAIN or (fid == F_CLIENT_ADDR and self.trusted):
                flags = 0
                if fid == F_PLAIN:
                    if _name_is(line, name_end, khp, khn, False):
                        flags = FL_KEY
                    elif v1 - v0 >= 7 and _name_is(line, name_end, <const uint8_t *>b"authorization", 13, False) \
                            and _ieq(line + v0, 7, b"bearer "):
                        flags = FL_KEY
                if nspans >= _scratch_cap:
                    _scratch_reserve(nspans + 1)
                sp = &_scratch[nspans]
                nspans += 1
                off = (line - b) - base
                sp.off = <int32_t>off
                sp.name_len = <int32_t>name_end
                sp.v0 = <int32_t>(off + v0)
                sp.vlen = <int32_t>(v1 - v0)
                sp.flags = flags
            elif fid == F_CLIENT_ADDR:
                continue
            elif fid == F_HOST:
                if has_host:
                    return self._refuse(ev, E_BAD, "more than one Host header")
                has_host = True
                if not _authority(line + v0, v1 - v0):
                    return self._refuse(ev, E_BAD, "Host is not a valid authority")
                if not h.absolute:  # an absolute-form target's authority wins (RFC 9112 §3.2.2)
                    h.host = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
            elif fid == F_CL:
                if has_cl:
                    return self._refuse(ev, E_BAD, "more than one Content-Length")
                has_cl = True
                cl = _digits(line + v0, v1 - v0)
                if cl < 0:
                    return self._refuse(ev, E_BAD, "Content-Length is not a decimal number")
            elif fid == F_TE:
                if has_te:
                    return self._refuse(ev, E_BAD, "more than one Transfer-Encoding")
                has_te = True
                if not _ieq(line + v0, v1 - v0, b"chunked"):
                    return self._refuse(ev, E_BAD, "unsupported transfer coding (only a single 'chunked')")
            elif fid == F_CONNECTION:
                j = v0
                while j <= v1:
                    k = j
                    while k < v1 and line[k] != 44:
                        k += 1
                    t0 = j
                    while t0 < k and (line[t0] == 32 or line[t0] == 9):
                        t0 += 1
                    t1 = k
                    while t1 > t0 and (line[t1 - 1] == 32 or line[t1 - 1] == 9):
                        t1 -= 1
                    if t1 > t0:
                        if _ieq(line + t0, t1 - t0, b"close"):
                            conn_close = True
                        elif _ieq(line + t0, t1 - t0, b"keep-alive"):
                            conn_keep = True
                        elif _ieq(line + t0, t1 - t0, b"upgrade"):
                            conn_upgrade = True
                        else:
                            if h.conn_tokens is None:
                                h.conn_tokens = []
                            tok = PyBytes_FromStringAndSize(<const char *>line + t0, t1 - t0)
                            h.conn_tokens.append(tok.lower())
                    j = k + 1
            elif fid == F_UPGRADE:
                nupgrade += 1
                upgrade_ok = _ieq(line + v0, v1 - v0, b"websocket")
            elif fid == F_EXPECT:
                if _ieq(line + v0, v1 - v0, b"100-continue"):
                    h.expect_continue = True
            elif fid == F_XFF:
                value = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
                h.xff = value if h.xff is None else h.xff + b", " + value
            elif fid == F_XFP:
                if self.trusted and h.xfp is None:
                    h.xfp = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
            elif fid == F_XFH:
                if self.trusted and h.xfh is None:
                    h.xfh = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
            elif fid == F_RID:
                if h.request_id is None:
                    h.request_id = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
            elif fid == F_OVERRIDE:
                if h.method_override is None:
                    h.method_override = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
                    h.method_override_line = PyBytes_FromStringAndSize(<const char *>line, name_end) + b": " \
                        + h.method_override + b"\r\n"
        # ---- message semantics
        h.nfields = nfields
        if h.version == 11 and not has_host:
            return self._refuse(ev, E_BAD, "HTTP/1.1 request without a Host header")
        if has_te:
            if has_cl:
                return self._refuse(ev, E_BAD, "both Content-Length and Transfer-Encoding")
            if h.version == 10:
                return self._refuse(ev, E_BAD, "Transfer-Encoding in an HTTP/1.0 request")
            h.chunked = True
        h.length = cl
        h.keep_alive = (not conn_close) if h.version == 11 else (conn_keep and not conn_close)
        if nspans:
            h.raw = PyBytes_FromStringAndSize(<const char *>b + base, n - base)
            h.spans = PyBytes_FromStringAndSize(<const char *>_scratch, nspans * sizeof(_Span))
            h.nspans = nspans
            self._resolve(h)
        if conn_upgrade and nupgrade == 1 and upgrade_ok:
            if conn_close:
                return self._refuse(ev, E_UPGRADE, "Upgrade together with Connection: close")
            if h.version != 11 or h.method != b"GET":
                return self._refuse(ev, E_UPGRADE, "a WebSocket upgrade is an HTTP/1.1 GET")
            if h.chunked or cl > 0:
                return self._refuse(ev, E_UPGRADE, "a WebSocket upgrade request has no body")
            h.upgrade = b"websocket"
        # any other protocol (h2c, ...) is never offered upstream: the request goes
        # on as plain HTTP/1.1 and can never open a tunnel
        self.seq += 1
        h.seq = self.seq
        ev.append(EV_HEAD)
        ev.append(h)
        # a message that ends the connection is the last one read (RFC 9112 §9.6)
        self.after = S_HEAD if h.keep_alive else S_CLOSED
        self.state = self.after
        if h.upgrade is not None:
            self.state = S_UPGRADED
        elif h.chunked:
            self._start_chunked()
        elif cl > 0:
            self.state = S_LENGTH
            self.remaining = cl
        return True

    cdef bint _refuse(self, list ev, code, message) except -1:
        self._err(code, message)
        self._fail(ev, self.seq + 1)
        return False

    cdef bint _target(self, Head h, const uint8_t *t, Py_ssize_t n) except -1:
        """origin-form, or absolute-form with an http/https scheme; nothing else
        (no authority-form CONNECT, no asterisk-form)."""
        cdef Py_ssize_t a0, a1, qi
        cdef const uint8_t *q
        self.terr_code = E_BAD
        if t[0] == 47:  # '/'
            a1 = 0
        else:
            if n > 7 and _ieq(t, 7, b"http://"):
                a0 = 7
            elif n > 8 and _ieq(t, 8, b"https://"):
                a0 = 8
            else:
                self.terr = "request target is not a path or an absolute http URL"
                return False
            a1 = a0
            while a1 < n and t[a1] != 47 and t[a1] != 63:
                if t[a1] == 64:
                    self.terr = "userinfo in the request target"
                    return False
                a1 += 1
            if not _authority(t + a0, a1 - a0):
                self.terr = "the request target's authority is not valid"
                return False
            h.absolute = True
            h.host = PyBytes_FromStringAndSize(<const char *>t + a0, a1 - a0)
        q = <const uint8_t *>memchr(t + a1, 63, n - a1)
        qi = n if q == NULL else q - t
        h.path = b"/" if qi == a1 else PyBytes_FromStringAndSize(<const char *>t + a1, qi - a1)
        h.query = b"" if qi == n else PyBytes_FromStringAndSize(<const char *>t + qi, n - qi)
        return True

    cdef int _classify(self, const uint8_t *name, Py_ssize_t n, bint under) noexcept:
        """F_* for a field, or -1 when it is dropped (compared in place)."""
        cdef int fid
        cdef bytes kh
        if under:
            if not self.underscores:
                return -1
            # an alias of a field we manage (Content_Length, X_Api_Key, ...) could
            # become that field behind a back end that maps '_' to '-': drop it
            kh = self.key_header
            if _known(name, n, True) >= 0 \
                    or _name_is(name, n, <const uint8_t *>PyBytes_AS_STRING(kh), PyBytes_GET_SIZE(kh), True) \
                    or (n >= 11 and _name_is(name, 11, <const uint8_t *>b"x-fastgate-", 11, True)):
                return -1
            return F_PLAIN
        fid = _known(name, n, False)
        if fid >= 0:
            return fid
        if n >= 11 and _name_is(name, 11, <const uint8_t *>b"x-fastgate-", 11, False):
            return -1  # identity fields are the gateway's to set
        return F_PLAIN

    cdef int _resolve(self, Head h) except -1:
        """After the head: fields named in Connection are hop-by-hop; the key is
        the first key field's value (a key field named in Connection is no key)."""
        cdef const char *raw = PyBytes_AS_STRING(h.raw)
        cdef _Span *sp = <_Span *>PyBytes_AS_STRING(h.spans)
        cdef int i
        cdef Py_ssize_t k0, k1
        cdef const uint8_t *v
        cdef list tokens = h.conn_tokens
        if tokens:
            for i in range(h.nspans):
                for tok in tokens:
                    if _ieq(<const uint8_t *>raw + sp[i].off, sp[i].name_len, <bytes>tok):
                        sp[i].flags |= FL_CONN
                        break
        for i in range(h.nspans):
            if sp[i].flags & FL_KEY and not sp[i].flags & FL_CONN:
                h.has_key_field = True
                v = <const uint8_t *>raw + sp[i].v0
                k0 = 0
                k1 = sp[i].vlen
                if sp[i].name_len == 13 and _name_is(<const uint8_t *>raw + sp[i].off, 13,
                                                     <const uint8_t *>b"authorization", 13, False):
                    k0 = 7
                    while k0 < k1 and (v[k0] == 32 or v[k0] == 9):
                        k0 += 1
                if h.key is None:
                    h.key = PyBytes_FromStringAndSize(<const char *>v + k0, k1 - k0)
                elif PyBytes_GET_SIZE(h.key) != k1 - k0 or memcmp(PyBytes_AS_STRING(h.key), v + k0, k1 - k0) != 0:
                    h.key_conflict = True
        return 0


# ------------------------------------------------------------------ responses

cdef object E_UP = "upstream_unavailable"

DEF MAX_RESP_FIELDS = 256


@cython.freelist(64)
cdef class ResponseHead:
    """A parsed upstream response head, ready to forward."""
    cdef readonly int status
    cdef readonly int version          # 10 or 11
    cdef readonly bytes fields         # the field lines to forward ("Name: value\r\n" each, as received)
    cdef readonly int64_t length       # Content-Length, or -1
    cdef readonly bytes length_raw     # its digits, or None
    cdef readonly bint chunked
    cdef readonly bint until_close     # the body ends when the upstream closes the connection
    cdef readonly bint no_body         # HEAD, 1xx, 204, 304
    cdef readonly bint keep_alive      # the connection may carry another request after this


cdef struct _Field:
    Py_ssize_t start, end           # the whole line, CRLF included
    Py_ssize_t name_end
    int kind


cdef enum:
    R_KEEP = 0
    R_DROP = 1       # hop-by-hop, or framing we redo
    R_CL = 2
    R_TE = 3
    R_CONNECTION = 4

cdef inline int _resp_kind(const uint8_t *p, Py_ssize_t n) noexcept:
    """What a response field name is to us, without making an object of it."""
    if n == 14:
        return R_CL if _ieq(p, n, b"content-length") else R_KEEP
    if n == 17:
        return R_TE if _ieq(p, n, b"transfer-encoding") else R_KEEP
    if n == 10:
        if _ieq(p, n, b"connection"):
            return R_CONNECTION
        return R_DROP if _ieq(p, n, b"keep-alive") else R_KEEP
    if n == 16:
        return R_DROP if _ieq(p, n, b"proxy-connection") else R_KEEP
    if n == 7:
        return R_DROP if _ieq(p, n, b"trailer") or _ieq(p, n, b"upgrade") else R_KEEP
    if n == 2:
        return R_DROP if _ieq(p, n, b"te") else R_KEEP
    return R_KEEP


cdef class ResponseParser(_Body):
    """Strict parser for the responses of one upstream connection.

    ``start(head_request, upgrade)`` is called when a request has been sent; then
    ``feed(data)`` returns events as RequestParser does: EV_HEAD (a
    ResponseHead; interim 1xx responses are skipped), EV_BODY (decoded),
    EV_END, EV_UPGRADE (the bytes after a 101 that was asked for), or EV_ERROR
    ``(code, message, 0)``. ``eof()`` is called when the upstream closes.

    The status line and the framing fields are parsed; every other field is
    passed through as it came, in one copied block, without the hop-by-hop
    fields, the ones named in Connection, and Content-Length/Transfer-Encoding
    (the client side states its own framing). Ambiguous framing (both CL and
    TE, several CL, a transfer coding but a single chunked) is an error: the
    connection's state would be a guess."""

    cdef Py_ssize_t max_head
    cdef bint head_request
    cdef bint upgrade_ok
    cdef bytearray buf
    cdef Py_ssize_t scan_pos
    cdef _Field fields[MAX_RESP_FIELDS]

    def __init__(self, *, Py_ssize_t max_head=65536, Py_ssize_t max_ext=4096, int max_trailers=64,
                 Py_ssize_t max_trailer_bytes=16384):
        self.max_head = max_head
        self.max_ext = max_ext
        self.max_trailers = max_trailers
        self.max_trailer_bytes = max_trailer_bytes
        self.bad = E_UP
        self.too_big = E_UP
        self.state = S_IDLE
        self.after = S_IDLE
        self.error = None
        self.buf = bytearray()
        self.scan_pos = 0

    def start(self, bint head_request=False, bint upgrade=False):
        """A request went out: its response comes next."""
        if self.state == S_DEAD:
            return
        self.state = S_HEAD
        self.head_request = head_request
        self.upgrade_ok = upgrade
        self.buf = bytearray()
        self.scan_pos = 0

    @property
    def idle(self):
        """No response is outstanding (the last one is complete)."""
        return self.state == S_IDLE

    @property
    def until_close(self):
        return self.state == S_UNTIL_CLOSE

    @property
    def dead(self):
        return self.state == S_DEAD

    def eof(self):
        """The upstream closed: the end of a close-delimited body, or an error."""
        cdef list ev = []
        if self.state == S_UNTIL_CLOSE:
            self.state = S_CLOSED
            ev.append(EV_END)
            ev.append(None)
        elif self.state != S_IDLE and self.state != S_CLOSED and self.state != S_DEAD:
            self._err(E_UP, "upstream closed the connection mid-response")
            self.state = S_DEAD
            ev.append(EV_ERROR)
            ev.append((self.error[0], self.error[1], 0))
        return ev

    def feed(self, bytes data not None):
        cdef list ev = []
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0, r, old, take
        cdef int st
        cdef bytes head
        while i < n:
            st = self.state
            if st == S_HEAD:
                if len(self.buf) == 0:
                    r = self._find_end(p + i, n - i)
                    if r == -2:
                        return self._rfail(ev)
                    if r == -1:
                        self.buf += data[i:] if i else data
                        return ev
                    if not self._head(ev, p + i, r, data, i):
                        return self._rfail(ev)
                    i += r
                    if self.state == S_UPGRADED:
                        ev.append(EV_UPGRADE)
                        ev.append(data[i:])
                        return ev
                else:
                    old = len(self.buf)
                    take = n - i
                    if old + take > self.max_head + 1:
                        take = self.max_head + 1 - old
                        if take < 0:
                            take = 0
                    self.buf += data[i:i + take]
                    r = self._find_end(<const uint8_t *>(<char *>self.buf), len(self.buf))
                    if r == -2:
                        return self._rfail(ev)
                    if r == -1:
                        return ev
                    head = bytes(self.buf[:r])
                    self.buf = bytearray()
                    if not self._head(ev, <const uint8_t *>PyBytes_AS_STRING(head), r, head, 0):
                        return self._rfail(ev)
                    i += r - old
                    if self.state == S_UPGRADED:
                        ev.append(EV_UPGRADE)
                        ev.append(data[i:])
                        return ev
            elif st == S_LENGTH:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                ev.append(EV_BODY)
                ev.append(data if (i == 0 and take == n) else PyBytes_FromStringAndSize(<const char *>p + i, take))
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    ev.append(EV_END)
                    ev.append(None)
                    self.state = self.after
            elif st == S_UNTIL_CLOSE:
                ev.append(EV_BODY)
                ev.append(data[i:] if i else data)
                return ev
            elif st == S_UPGRADED:
                ev.append(EV_UPGRADE)
                ev.append(data[i:] if i else data)
                return ev
            elif st == S_CLOSED or st == S_DEAD:
                return ev  # after a response that ends the connection: ignored
            elif st == S_IDLE:
                self._err(E_UP, "upstream sent bytes with no request outstanding")
                return self._rfail(ev)
            else:
                r = self._chunked(ev, p, i, n)
                if r < 0:
                    return self._rfail(ev)
                i = r
        return ev

    cdef list _rfail(self, list ev):
        self.state = S_DEAD
        self.buf = bytearray()
        ev.append(EV_ERROR)
        ev.append((self.error[0], self.error[1], 0))
        return ev

    cdef Py_ssize_t _find_end(self, const uint8_t *b, Py_ssize_t n) except -3:
        """Offset past the empty line ending the head; -1: not yet; -2: error."""
        cdef Py_ssize_t pos = self.scan_pos, eol
        cdef const uint8_t *q
        while True:
            q = <const uint8_t *>memchr(b + pos, 10, n - pos)
            if q == NULL:
                if n > self.max_head:
                    self._err(E_UP, "upstream response head exceeds the size limit")
                    return -2
                return -1
            eol = q - b
            if eol == pos or b[eol - 1] != 13:
                self._err(E_UP, "bare LF in the upstream response head")
                return -2
            if eol == pos + 1:
                self.scan_pos = 0
                if pos == 0:
                    self._err(E_UP, "empty line where the upstream's status line should be")
                    return -2
                return eol + 1
            pos = eol + 1
            self.scan_pos = pos

    cdef bint _head(self, list ev, const uint8_t *b, Py_ssize_t n, bytes src, Py_ssize_t base) except -1:
        """Parse b[:n]; False on error (self.error set)."""
        cdef ResponseHead h
        cdef Py_ssize_t pos, eol, k, v0, v1, t0, t1, j, total, nf = 0, f
        cdef const uint8_t *line
        cdef const uint8_t *q
        cdef int status, kind
        cdef bint has_cl = False, has_te = False, conn_close = False, conn_keep = False, keep_all
        cdef int64_t cl = -1
        cdef bytes cl_raw = None
        cdef list drop = None
        cdef object lname
        cdef PyObject *o
        cdef char *out
        cdef bytes fields
        # status line: HTTP/1.x SP 3DIGIT [SP reason] CRLF
        q = <const uint8_t *>memchr(b, 10, n)
        eol = q - b - 1
        if eol < 12 or b[0] != 72 or b[1] != 84 or b[2] != 84 or b[3] != 80 or b[4] != 47 or b[5] != 49 \
                or b[6] != 46 or not (b[7] == 48 or b[7] == 49) or b[8] != 32:
            self._err(E_UP, "malformed upstream status line")
            return False
        for k in range(9, 12):
            if not 48 <= b[k] <= 57:
                self._err(E_UP, "malformed upstream status code")
                return False
        status = (b[9] - 48) * 100 + (b[10] - 48) * 10 + (b[11] - 48)
        if status < 100:
            self._err(E_UP, "malformed upstream status code")
            return False
        if eol > 12:
            if b[12] != 32:
                self._err(E_UP, "malformed upstream status line")
                return False
            for k in range(13, eol):
                if not CLS[b[k]] & C_VALUE:
                    self._err(E_UP, "control character in the upstream reason phrase")
                    return False
        pos = eol + 2
        # fields: note each line's span and kind; the kept ones are copied after
        while True:
            q = <const uint8_t *>memchr(b + pos, 10, n - pos)
            eol = q - b - 1  # at the CR (checked by _find_end)
            if eol == pos:
                break
            if nf >= MAX_RESP_FIELDS:
                self._err(E_UP, "too many upstream response header fields")
                return False
            line = b + pos
            if line[0] == 32 or line[0] == 9:
                self._err(E_UP, "obsolete line folding in an upstream header field")
                return False
            k = 0
            while pos + k < eol and CLS[line[k]] & C_TCHAR:
                k += 1
            if k == 0 or pos + k >= eol or line[k] != 58:
                self._err(E_UP, "malformed upstream header field")
                return False
            self.fields[nf].start = pos
            self.fields[nf].end = eol + 2
            self.fields[nf].name_end = pos + k
            v0 = k + 1
            while pos + v0 < eol and (line[v0] == 32 or line[v0] == 9):
                v0 += 1
            v1 = eol - pos
            while v1 > v0 and (line[v1 - 1] == 32 or line[v1 - 1] == 9):
                v1 -= 1
            for j in range(v0, v1):
                if not CLS[line[j]] & C_VALUE:
                    self._err(E_UP, "control character in an upstream header field value")
                    return False
            kind = _resp_kind(line, k)
            if kind == R_CL:
                if has_cl:
                    self._err(E_UP, "more than one Content-Length in an upstream response")
                    return False
                has_cl = True
                cl = _digits(line + v0, v1 - v0)
                if cl < 0:
                    self._err(E_UP, "upstream Content-Length is not a decimal number")
                    return False
                cl_raw = PyBytes_FromStringAndSize(<const char *>line + v0, v1 - v0)
            elif kind == R_TE:
                if has_te or not _ieq(line + v0, v1 - v0, b"chunked"):
                    self._err(E_UP, "upstream transfer coding other than a single 'chunked'")
                    return False
                has_te = True
            elif kind == R_CONNECTION:
                j = v0
                while j <= v1:
                    t1 = j
                    while t1 < v1 and line[t1] != 44:
                        t1 += 1
                    t0 = j
                    j = t1 + 1
                    while t0 < t1 and (line[t0] == 32 or line[t0] == 9):
                        t0 += 1
                    while t1 > t0 and (line[t1 - 1] == 32 or line[t1 - 1] == 9):
                        t1 -= 1
                    if t1 > t0:
                        if _ieq(line + t0, t1 - t0, b"close"):
                            conn_close = True
                        elif _ieq(line + t0, t1 - t0, b"keep-alive"):
                            conn_keep = True
                        else:
                            if drop is None:
                                drop = []
                            drop.append(PyBytes_FromStringAndSize(<const char *>line + t0, t1 - t0).lower())
            self.fields[nf].kind = kind
            nf += 1
            pos = eol + 2
        if has_cl and has_te:
            self._err(E_UP, "upstream response with both Content-Length and Transfer-Encoding")
            return False
        if drop is not None:  # fields named in Connection are hop-by-hop too
            for f in range(nf):
                if self.fields[f].kind == R_KEEP:
                    line = b + self.fields[f].start
                    lname = _lower(line, self.fields[f].name_end - self.fields[f].start, None) or \
                        PyBytes_FromStringAndSize(<const char *>line, self.fields[f].name_end - self.fields[f].start)
                    if lname in drop:
                        self.fields[f].kind = R_DROP
        keep_all = status == 101  # Connection/Upgrade are the 101 itself: passed on whole
        total = 0
        for f in range(nf):
            if keep_all or self.fields[f].kind == R_KEEP:
                total += self.fields[f].end - self.fields[f].start
        fields = PyBytes_FromStringAndSize(NULL, total)
        out = PyBytes_AS_STRING(fields)
        for f in range(nf):
            if keep_all or self.fields[f].kind == R_KEEP:
                memcpy(out, b + self.fields[f].start, self.fields[f].end - self.fields[f].start)
                out += self.fields[f].end - self.fields[f].start
        h = ResponseHead.__new__(ResponseHead)
        h.status = status
        h.version = 11 if b[7] == 49 else 10
        h.fields = fields
        h.length = cl
        h.length_raw = cl_raw
        h.keep_alive = (not conn_close) if h.version == 11 else (conn_keep and not conn_close)
        if status < 200:
            if status == 101:
                if not self.upgrade_ok:
                    self._err(E_UP, "upstream switched protocols unasked")
                    return False
                h.no_body = True
                ev.append(EV_HEAD)
                ev.append(h)
                # feed() hands over what follows the head (b"" if nothing yet):
                # the caller becomes a byte pipe at this event
                self.state = S_UPGRADED
                return True
            self.state = S_HEAD  # an interim response: the final one follows
            return True
        if self.upgrade_ok:
            h.keep_alive = False  # an upgrade that was not accepted: never reused
        self.after = S_IDLE if h.keep_alive else S_CLOSED
        ev.append(EV_HEAD)
        ev.append(h)
        if self.head_request or status == 204 or status == 304:
            h.no_body = True
            ev.append(EV_END)
            ev.append(None)
            self.state = self.after
        elif has_te:
            h.chunked = True
            self._start_chunked()
        elif has_cl:
            if cl == 0:
                ev.append(EV_END)
                ev.append(None)
                self.state = self.after
            else:
                self.state = S_LENGTH
                self.remaining = cl
        else:
            h.until_close = True
            h.keep_alive = False
            self.state = S_UNTIL_CLOSE
        return True


# ------------------------------------------------------------------ helpers

cdef inline object _lower(const uint8_t *p, Py_ssize_t n, object same):
    """p[:n] lower-cased as bytes; `same` when it has no upper-case letter (None: make it)."""
    cdef Py_ssize_t i
    cdef bytes out
    cdef char *o
    for i in range(n):
        if 65 <= p[i] <= 90:
            break
    else:
        return same
    out = PyBytes_FromStringAndSize(NULL, n)
    o = PyBytes_AS_STRING(out)
    for i in range(n):
        o[i] = LOWER[p[i]]
    return out


cdef inline bint _ieq(const uint8_t *p, Py_ssize_t n, bytes lit) noexcept:
    """Case-insensitive equality with a lower-case literal."""
    cdef Py_ssize_t i, m = PyBytes_GET_SIZE(lit)
    cdef const uint8_t *s = <const uint8_t *>PyBytes_AS_STRING(lit)
    if n != m:
        return False
    for i in range(n):
        if LOWER[p[i]] != s[i]:
            return False
    return True


cdef inline bint _eqs(const uint8_t *p, Py_ssize_t n, bytes lit) noexcept:
    cdef Py_ssize_t i, m = PyBytes_GET_SIZE(lit)
    cdef const uint8_t *s = <const uint8_t *>PyBytes_AS_STRING(lit)
    if n != m:
        return False
    for i in range(n):
        if p[i] != s[i]:
            return False
    return True


cdef int64_t _digits(const uint8_t *p, Py_ssize_t n) noexcept:
    """1*DIGIT (at most 18) -> value, else -1."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    if n == 0 or n > 18:
        return -1
    for i in range(n):
        if not 48 <= p[i] <= 57:
            return -1
        v = v * 10 + (p[i] - 48)
    return v


cdef bint _authority(const uint8_t *p, Py_ssize_t n) noexcept:
    """RFC 3986 §3.2.2 host [ ":" port ] with host a reg-name of unreserved
    characters (no sub-delims: no comma lists, no ';'), an IPv4 address, or an
    IPv6 literal in brackets (no zone id); port 1-65535. No userinfo."""
    cdef Py_ssize_t i = 0, h1, j
    cdef char buf[48]
    cdef uint8_t addr[16]
    cdef int64_t port
    if n == 0 or n > 262:
        return False
    if p[0] == 91:  # '['
        i = 1
        while i < n and p[i] != 93:
            if not (CLS[p[i]] & C_HEX or p[i] == 58 or p[i] == 46):
                return False
            i += 1
        if i >= n or i - 1 > 45 or i == 1:
            return False
        memcpy(buf, p + 1, i - 1)
        buf[i - 1] = 0
        if inet_pton(AF_INET6, buf, addr) != 1:
            return False
        h1 = i + 1
    else:
        while i < n and CLS[p[i]] & C_REGNAME:
            i += 1
        if i == 0 or i > 253:
            return False
        h1 = i
    if h1 == n:
        return True
    if p[h1] != 58:
        return False
    j = h1 + 1
    if j == n or n - j > 5:
        return False
    port = _digits(p + j, n - j)
    return 1 <= port <= 65535

include "http/out.pxi"
include "http/proxy.pxi"
include "http/stages.pxi"
include "http/meter.pxi"
