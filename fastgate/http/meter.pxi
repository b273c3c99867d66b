# HOT PATH, included by fastgate/_http.pyx: step 9's counters, per worker.
#
# Per request: one update of a C hash table for the request counter (its key
# packs route, status class, deciding stage and plan, each an id from a table
# that only grows, so counts survive reloads; the labels come from the config,
# never from the client, so the table is bounded), one C binary search and a C
# array update for the route's latency histogram, and one dict update for the
# key's usage. requests()/latencies() turn them into the labelled snapshot
# /metrics sums.

from libc.stdlib cimport calloc, free
from fastgate.errors import STAGE_OF as _STAGE_OF


cdef class Meter:
    cdef double bounds[32]
    cdef int nbounds
    # packed label id + 1 -> requests (open addressing; 0 = empty)
    cdef int64_t *ckeys
    cdef int64_t *cvals
    cdef Py_ssize_t ccap
    cdef Py_ssize_t cused
    # by route id: nbounds + 1 bucket counts (the last is +Inf), and the sum of seconds
    cdef int64_t *lat
    cdef double *lat_sum
    cdef Py_ssize_t lat_cap
    cdef dict names               # route name -> id
    cdef list route_names
    cdef dict decisions           # decision -> id
    cdef list decision_names
    cdef dict plans               # plan name -> id
    cdef list plan_names
    cdef public dict usage        # key slot -> [1xx, 2xx, 3xx, 4xx, 5xx, bytes_in, bytes_out]

    def __init__(self, bounds):
        cdef int i
        self.nbounds = len(bounds)
        if self.nbounds > 32:
            raise ValueError("at most 32 latency buckets")
        for i in range(self.nbounds):
            self.bounds[i] = bounds[i]
        self._grow_counts(64)
        self._grow_routes(16)
        self.names = {"": 0}
        self.route_names = [""]
        self.decisions = {}
        self.decision_names = []
        self.plans = {"": 0}
        self.plan_names = [""]
        self.usage = {}
        for d in ("proxied", "internal", "parse"):
            self._decision(d)

    def __dealloc__(self):
        free(self.ckeys)
        free(self.cvals)
        free(self.lat)
        free(self.lat_sum)

    cdef int _grow_counts(self, Py_ssize_t cap) except -1:
        cdef int64_t *keys = <int64_t *>calloc(cap, sizeof(int64_t))
        cdef int64_t *vals = <int64_t *>calloc(cap, sizeof(int64_t))
        cdef Py_ssize_t i, j
        if keys == NULL or vals == NULL:
            free(keys)
            free(vals)
            raise MemoryError()
        for i in range(self.ccap):
            if self.ckeys[i]:
                j = self.ckeys[i] & (cap - 1)
                while keys[j]:
                    j = (j + 1) & (cap - 1)
                keys[j] = self.ckeys[i]
                vals[j] = self.cvals[i]
        free(self.ckeys)
        free(self.cvals)
        self.ckeys = keys
        self.cvals = vals
        self.ccap = cap
        return 0

    cdef int _grow_routes(self, Py_ssize_t cap) except -1:
        cdef int w = self.nbounds + 1
        cdef int64_t *lat = <int64_t *>calloc(cap * w, sizeof(int64_t))
        cdef double *sums = <double *>calloc(cap, sizeof(double))
        if lat == NULL or sums == NULL:
            free(lat)
            free(sums)
            raise MemoryError()
        if self.lat != NULL:
            memcpy(lat, self.lat, self.lat_cap * w * sizeof(int64_t))
            memcpy(sums, self.lat_sum, self.lat_cap * sizeof(double))
        free(self.lat)
        free(self.lat_sum)
        self.lat = lat
        self.lat_sum = sums
        self.lat_cap = cap
        return 0

    cdef inline int _route(self, str name) except -1:
        cdef object i = self.names.get(name)
        if i is None:
            i = self.names[name] = len(self.route_names)
            self.route_names.append(name)
            if i >= self.lat_cap:
                self._grow_routes(2 * self.lat_cap)
        return i

    cdef inline int _decision(self, str name):
        cdef object i = self.decisions.get(name)
        if i is None:
            i = self.decisions[name] = len(self.decision_names)
            self.decision_names.append(name)
        return i

    cdef inline int _plan(self, str name):
        cdef object i = self.plans.get(name)
        if i is None:
            i = self.plans[name] = len(self.plan_names)
            self.plan_names.append(name)
        return i

    cdef inline int _count(self, long long k) except -1:
        cdef int64_t key = k + 1
        cdef Py_ssize_t mask = self.ccap - 1
        cdef Py_ssize_t j = key & mask
        while True:
            if self.ckeys[j] == key:
                self.cvals[j] += 1
                return 0
            if self.ckeys[j] == 0:
                break
            j = (j + 1) & mask
        if 2 * (self.cused + 1) > self.ccap:
            self._grow_counts(2 * self.ccap)
            return self._count(k)
        self.ckeys[j] = key
        self.cvals[j] = 1
        self.cused += 1
        return 0

    cpdef count_status(self, int status):
        """A refusal that never became an exchange (malformed head), or a 101."""
        self._count(((0 * 8 + status // 100) * 64 + self._decision("parse" if status >= 400 else "proxied")) * 4096)

    cpdef account(self, Exchange ex):
        cdef Decision d = ex.d
        route = d.route
        cdef int rid = 0 if route is None else self._route(route.name)
        cdef int cls = ex.status // 100
        cdef int did
        if ex.error is None:
            did = 0
        else:
            did = self._decision(_STAGE_OF.get(ex.error, "internal"))
        key = d.key
        cdef int pid = 0 if key is None else self._plan(key[2])
        self._count((((<long long>rid * 8 + cls) * 64 + did) * 4096) + pid)
        cdef double dt = ((ex.t.end or _now_ns()) - ex.t.start) / 1e9
        cdef int lo = 0, hi = self.nbounds, mid
        while lo < hi:  # bisect_left over the bucket bounds
            mid = (lo + hi) >> 1
            if self.bounds[mid] < dt:
                lo = mid + 1
            else:
                hi = mid
        self.lat[rid * (self.nbounds + 1) + lo] += 1
        self.lat_sum[rid] += dt
        cdef list u
        if key is not None:
            u = self.usage.get(d.key_index)
            if u is None:
                u = self.usage[d.key_index] = [0, 0, 0, 0, 0, 0, 0]
            if 1 <= cls <= 5:
                u[cls - 1] = u[cls - 1] + 1
            u[5] = u[5] + ex.body_seen
            u[6] = u[6] + ex.bytes_out

    def requests(self):
        """[[route, status class, decision, plan, count], ...] for the stats snapshot."""
        out = []
        cdef Py_ssize_t i
        for i in range(self.ccap):
            if not self.ckeys[i]:
                continue
            k = self.ckeys[i] - 1
            n = self.cvals[i]
            pid = k % 4096
            rest = k // 4096
            did = rest % 64
            rest //= 64
            out.append([self.route_names[rest // 8], rest % 8, self.decision_names[did], self.plan_names[pid], n])
        return out

    def latencies(self):
        """{route: [bucket counts..., +Inf, sum]} for the routes that saw requests."""
        cdef int w = self.nbounds + 1, i, j
        out = {}
        for i in range(len(self.route_names)):
            h = [self.lat[i * w + j] for j in range(w)]
            if any(h):
                out[self.route_names[i]] = h + [self.lat_sum[i]]
        return out
