# HOT PATH, included by fastgate/_http.pyx: one growable output buffer per
# process (a worker is single-threaded) to build heads with memcpy, and the
# small formatters they need (glibc's snprintf cost ~1.3k instructions a call).

from libc.stdlib cimport realloc as _realloc

cdef char *_ob = NULL
cdef Py_ssize_t _ob_cap = 0
cdef Py_ssize_t _ob_len = 0


cdef inline int _ob_reserve(Py_ssize_t more) except -1:
    global _ob, _ob_cap
    cdef Py_ssize_t want = _ob_len + more
    cdef Py_ssize_t cap
    cdef char *p
    if want <= _ob_cap:
        return 0
    cap = _ob_cap * 2 if _ob_cap else 4096
    while cap < want:
        cap *= 2
    p = <char *>_realloc(_ob, cap)
    if p == NULL:
        raise MemoryError()
    _ob = p
    _ob_cap = cap
    return 0


cdef inline void _ob_reset() noexcept:
    global _ob_len
    _ob_len = 0


cdef inline int _ob_put(const char *s, Py_ssize_t n) except -1:
    global _ob_len
    _ob_reserve(n)
    memcpy(_ob + _ob_len, s, n)
    _ob_len += n
    return 0


cdef inline int _ob_bytes(bytes b) except -1:
    return _ob_put(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef inline int _ob_int(long long v) except -1:
    """Decimal, as %lld."""
    cdef char tmp[24]
    cdef int i = 24
    cdef unsigned long long u
    cdef bint neg = v < 0
    u = <unsigned long long>(-v) if neg else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if neg:
        i -= 1
        tmp[i] = 45
    return _ob_put(tmp + i, 24 - i)


cdef inline int _ob_hex(unsigned long long u) except -1:
    """Lower-case hex, as %llx."""
    cdef char tmp[20]
    cdef int i = 20
    while True:
        i -= 1
        tmp[i] = b"0123456789abcdef"[u & 15]
        u >>= 4
        if u == 0:
            break
    return _ob_put(tmp + i, 20 - i)


cdef inline bytes _ob_take():
    return PyBytes_FromStringAndSize(_ob, _ob_len)


# -- request ids -------------------------------------------------------------------------

cdef str _rid_prefix = ""
cdef bytes _rid_prefix_b = b""
cdef unsigned long long _rid = 0


def set_request_id_prefix(str prefix):
    """Request ids are this process's random prefix + a counter (16 hex digits)."""
    global _rid_prefix, _rid_prefix_b
    _rid_prefix = prefix
    _rid_prefix_b = prefix.encode("ascii")


cdef bytes _next_rid():
    """next_request_id() as the bytes that go on the wire (no str made and encoded)."""
    global _rid
    cdef Py_ssize_t n = PyBytes_GET_SIZE(_rid_prefix_b)
    cdef unsigned long long u
    cdef int i
    cdef bytes out
    cdef char *o
    if _rid + 1 >= (1ULL << 32):
        return next_request_id().encode("ascii")
    _rid += 1
    u = _rid
    out = PyBytes_FromStringAndSize(NULL, n + 8)
    o = PyBytes_AS_STRING(out)
    memcpy(o, PyBytes_AS_STRING(_rid_prefix_b), n)
    for i in range(7, -1, -1):
        o[n + i] = b"0123456789abcdef"[u & 15]
        u >>= 4
    return out


cpdef str next_request_id():
    global _rid
    cdef char tmp[8]
    cdef int i
    cdef unsigned long long u
    _rid += 1
    u = _rid
    for i in range(7, -1, -1):
        tmp[i] = b"0123456789abcdef"[u & 15]
        u >>= 4
    if u:  # past 2^32 ids: more digits, never a repeat
        return _rid_prefix + format(_rid, "08x")
    return _rid_prefix + PyUnicode_DecodeASCII(tmp, 8, NULL)
