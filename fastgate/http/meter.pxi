# HOT PATH, included by fastgate/_http.pyx: step 9's counters, per worker.
#
# One dict update per request for the request counter (its key is an int that
# packs route, status class, deciding stage and plan, each an id from a table
# that only grows, so counts survive reloads), one C binary search and a list
# update for the route's latency histogram, and one dict update for the key's
# usage. publish() turns them into the labelled snapshot /metrics sums.

from fastgate.errors import STAGE_OF as _STAGE_OF


cdef class Meter:
    cdef double bounds[32]
    cdef int nbounds
    cdef dict counts              # packed label id -> requests
    cdef dict names               # route name -> id
    cdef list route_names
    cdef dict decisions           # decision -> id
    cdef list decision_names
    cdef dict plans               # plan name -> id
    cdef list plan_names
    cdef list latency             # by route id: [bucket counts..., +Inf count, sum of seconds]
    cdef public dict usage        # key slot -> [1xx, 2xx, 3xx, 4xx, 5xx, bytes_in, bytes_out]

    def __init__(self, bounds):
        cdef int i
        self.nbounds = len(bounds)
        if self.nbounds > 32:
            raise ValueError("at most 32 latency buckets")
        for i in range(self.nbounds):
            self.bounds[i] = bounds[i]
        self.counts = {}
        self.names = {"": 0}
        self.route_names = [""]
        self.decisions = {}
        self.decision_names = []
        self.plans = {"": 0}
        self.plan_names = [""]
        self.latency = [[0] * (self.nbounds + 2)]
        self.usage = {}
        for d in ("proxied", "internal", "parse"):
            self._decision(d)

    cdef inline int _route(self, str name):
        cdef object i = self.names.get(name)
        if i is None:
            i = self.names[name] = len(self.route_names)
            self.route_names.append(name)
            self.latency.append([0] * (self.nbounds + 2))
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

    cdef inline void _count(self, long long k) except *:
        cdef object n = self.counts.get(k)
        self.counts[k] = 1 if n is None else n + 1

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
        cdef list h = self.latency[rid]
        h[lo] = h[lo] + 1
        h[self.nbounds + 1] = h[self.nbounds + 1] + dt
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
        for k, n in self.counts.items():
            pid = k % 4096
            rest = k // 4096
            did = rest % 64
            rest //= 64
            out.append([self.route_names[rest // 8], rest % 8, self.decision_names[did], self.plan_names[pid], n])
        return out

    def latencies(self):
        """{route: [bucket counts..., +Inf, sum]} for the routes that saw requests."""
        return {self.route_names[i]: h for i, h in enumerate(self.latency) if any(h[:self.nbounds + 1])}
