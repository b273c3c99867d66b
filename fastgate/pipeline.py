"""HOT PATH. The decision pipeline as named stages, compiled per route.

STAGES is the order every request goes through (DESIGN.md "Decision
pipeline"); the names are what the access log's ``decision`` and the metrics'
``decision`` label say when a stage answers a request itself:

    parse      the request parser: framing, limits, timeouts (fastgate._http)
    route      host + longest path prefix + method (and method override)
    client_ip  the peer, or X-Forwarded-For walked from trusted proxies
    ip         global allow/deny lists
    limits     the route's body limit (before credentials: an oversized
               upload never spends quota)
    key        the credential (an API key today; JWT later)
    scope      the key's scopes and CIDRs
    rate       the key's plan and own limits, or the route's per-address limits
    rewrite    what the upstream request becomes (path, method-override field)
    upstream   pool, balance, connect, send
    log        access log and counters: always runs, for every request

A stage is a small object with ``name`` and ``run(ex) -> bool``: True lets the
request go on; False means the stage answered it with a local reply. Each
stage class has ``build(route, worker)`` which compiles it for one route when
the config is applied, and returns None when the route does not use it, so an
unconfigured stage costs nothing per request. Adding a stage (JWT, a cache,
adaptive throttling, credits) is one class here, its place in STAGES, and its
config Struct in fastgate/config.py.

On key routes, key + scope + rate are one call into the core (fastgate._core):
the ``key`` stage makes it and keeps the verdict on the exchange; ``scope`` and
``rate`` answer from that verdict.
"""

from __future__ import annotations

import time
from urllib.parse import unquote_to_bytes

from . import config as cfg
from . import core
from .admin import keysync
from .ipfilter import pack_ip
from .server.http1 import double_encoded

STAGES = ("parse", "route", "client_ip", "ip", "limits", "key", "scope", "rate", "rewrite", "upstream", "log")

_WWW_AUTH = b'www-authenticate: Bearer realm="fastgate"\r\n'
_CONFLICT = object()
_KEY_MESSAGES = {
    core.NO_SUCH_KEY: "API key not recognised",
    core.KEY_MALFORMED: "API key is malformed or fails its checksum",
    core.KEY_REVOKED: "API key has been revoked",
    core.KEY_DISABLED: "API key is disabled",
    core.KEY_EXPIRED: "API key has expired",
    core.KEY_NOT_YET_VALID: "API key is not valid yet",
    core.SCOPE_DENIED: "API key may not call this method on this path",
    core.KEY_IP_DENIED: "API key may not be used from this address",
    core.KEY_BUSY: "key table is being written; retry",
}
_SCOPE_CODES = frozenset((core.SCOPE_DENIED, core.KEY_IP_DENIED))
_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400, "month": 2_592_000}


def policy_header(limits: dict[str, int]) -> bytes:
    """RateLimit-Policy (IETF httpapi draft): '10;w=1, 1000;w=86400'."""
    if not limits:
        return b""
    items = sorted(limits.items(), key=lambda kv: _WINDOW_SECONDS[kv[0]])
    return b"ratelimit-policy: " + ", ".join(f"{n};w={_WINDOW_SECONDS[u]}" for u, n in items).encode() + b"\r\n"


def rate_headers(rt, policy: bytes) -> bytes:
    reset = -(-rt.reset_ms // 1000)
    return b"ratelimit-limit: %d\r\nratelimit-remaining: %d\r\nratelimit-reset: %d\r\n%s" \
           b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: %d\r\nx-ratelimit-reset: %d\r\n" % (
               rt.limit, rt.remaining, reset, policy, rt.limit, rt.remaining, reset)


def rate_limited(ex, rt, r: int, policy: bytes) -> None:
    if r == core.RATE_TABLE_FULL:
        ex.conn.local_reply(ex, "rate_limited", "rate-limit table is full; try again later", b"retry-after: 1\r\n")
        return
    retry = max(1, -(-rt.retry_after_ms // 1000))
    ex.conn.local_reply(ex, "rate_limited", "rate limit exceeded", b"retry-after: %d\r\n" % retry
                        + rate_headers(rt, policy))


class Stage:
    """The contract: build() at config time, run() per request."""

    name = ""
    __slots__ = ("w", "route")

    def __init__(self, route, w):
        self.route = route
        self.w = w

    @classmethod
    def build(cls, route, w):
        return cls(route, w)

    def run(self, ex) -> bool:  # pragma: no cover - every stage overrides it
        raise NotImplementedError


class ClientIp(Stage):
    """The client address: the peer, or X-Forwarded-For walked right to left
    while the hops are trusted proxies."""

    name = "client_ip"
    __slots__ = ()

    def run(self, ex) -> bool:
        conn = ex.conn
        ex.client = self.w.ip.client_ip(conn.peer, True, ex.xff) if conn.trusted else conn.peer
        return True


class IpRules(Stage):
    name = "ip"
    __slots__ = ("ip",)

    def __init__(self, route, w):
        super().__init__(route, w)
        self.ip = w.ip

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if w.ip.active else None

    def run(self, ex) -> bool:
        if self.ip.denied(ex.client):
            ex.conn.local_reply(ex, "ip_denied", "client address is not allowed")
            return False
        return True


class BodyLimit(Stage):
    name = "limits"
    __slots__ = ("max_body",)

    def __init__(self, route, w):
        super().__init__(route, w)
        self.max_body = route.max_body

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.max_body < (1 << 62) else None

    def run(self, ex) -> bool:
        mb = self.max_body
        if (ex.length is not None and ex.length > mb) or ex.body_seen > mb:
            ex.conn.local_reply(ex, "body_too_large", f"request body exceeds {mb} bytes")
            return False
        return True


class KeyCredential(Stage):
    """The API key: from the configured header, Authorization: Bearer, or an
    opted-in query parameter; removed from what the upstream sees. One core
    call checks it, its scopes and CIDRs; its limits are counted right after.
    Failed checks count towards the address's failed-auth limit; only the
    failures beyond it get 429, so a valid key is never locked out."""

    name = "key"
    __slots__ = ("keys", "rates", "header", "param", "bits")

    def __init__(self, route, w):
        super().__init__(route, w)
        self.keys = w.keys
        self.rates = w.rates
        self.header = w.key_header
        self.param = route.key_query_param
        self.bits = w.method_bits

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    def run(self, ex) -> bool:
        conn = ex.conn
        key = self.take_key(ex)
        if key is None:
            conn.local_reply(ex, "key_missing", "this route needs an API key", _WWW_AUTH)
            return False
        if key is _CONFLICT:
            conn.local_reply(ex, "bad_request", "the request carries two different API keys")
            return False
        client = ex.client
        packed = conn.peer_packed if client is conn.peer else pack_ip(client)
        now_ms = time.time_ns() // 1_000_000
        method = ex.authz_method
        bit = self.bits.get(method)
        if bit is None:
            bit = core.method_bit(method)
        idx = self.keys.check_key(key, bit, ex.path, packed, now_ms)
        ex.verdict = idx
        if idx >= 0:
            w = self.w
            ident = w.identity(idx)
            ex.identity = ident[0]
            ex.key = ident[4]
            ex.key_index = idx
            ex.rate = self.rates.hit_key(ident[1], self.keys, idx, now_ms)
            ex.policy = ident[2]
            return True
        if idx in _SCOPE_CODES:
            return True  # the scope stage answers
        code = core.ERROR_CODE.get(idx, "key_invalid")
        if code == "key_invalid" and self.w.failed_auth(packed, now_ms):
            retry = max(1, -(-self.rates.retry_after_ms // 1000))
            conn.local_reply(ex, "rate_limited", "too many failed key checks from this address",
                             b"retry-after: %d\r\n" % retry)
            return False
        conn.local_reply(ex, code, _KEY_MESSAGES.get(idx, "API key refused"),
                         _WWW_AUTH if code in ("key_invalid", "key_expired") else
                         b"retry-after: 1\r\n" if code == "overloaded" else b"")
        return False

    def take_key(self, ex):
        """Find the key and remove it from what the upstream will see."""
        kh = self.header
        found = None
        keep = None
        headers = ex.headers
        for i, h in enumerate(headers):
            ln = h[0]
            if ln == kh:
                cand = h[2].strip()
            elif ln == b"authorization" and h[2][:7].lower() == b"bearer ":
                cand = h[2][7:].strip()
            else:
                continue
            if found is not None and cand != found:
                return _CONFLICT
            found = cand
            if keep is None:
                keep = headers[:i]
        if keep is not None:
            keep += [h for h in headers[len(keep):]
                     if h[0] != kh and not (h[0] == b"authorization" and h[2][:7].lower() == b"bearer ")]
            ex.headers = keep
        param = self.param
        if param and ex.query:
            rest = []
            for part in ex.query[1:].split(b"&"):
                name, _, value = part.partition(b"=")
                if name == param:
                    cand = unquote_to_bytes(value)
                    if found is not None and cand != found:
                        return _CONFLICT
                    found = cand
                else:
                    rest.append(part)
            ex.query = b"?" + b"&".join(rest) if rest else b""
        return found


class KeyScope(Stage):
    name = "scope"
    __slots__ = ()

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    def run(self, ex) -> bool:
        v = ex.verdict
        if v >= 0:
            return True
        code = core.ERROR_CODE[v]
        ex.conn.local_reply(ex, code, _KEY_MESSAGES[v])
        return False


class KeyRate(Stage):
    name = "rate"
    __slots__ = ("rates",)

    def __init__(self, route, w):
        super().__init__(route, w)
        self.rates = w.rates

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth == "key" else None

    def run(self, ex) -> bool:
        r = ex.rate
        if r == core.UNLIMITED:
            return True
        if r < 0:
            rate_limited(ex, self.rates, r, ex.policy)
            return False
        ex.resp_extra = rate_headers(self.rates, ex.policy)
        return True


class AddressRate(Stage):
    """Per-address limits on an open route (ip_limits)."""

    name = "rate"
    __slots__ = ("rates", "policy", "header")

    def __init__(self, route, w):
        super().__init__(route, w)
        self.rates = w.rates
        self.policy = route.ip_policy
        self.header = route.ip_policy_header

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if route.auth != "key" and route.ip_policy is not None else None

    def run(self, ex) -> bool:
        conn = ex.conn
        client = ex.client
        packed = conn.peer_packed if client is conn.peer else pack_ip(client)
        rt = self.rates
        r = rt.hit(self.policy, self.w.addr_subject(packed), time.time_ns() // 1_000_000)
        if r == core.UNLIMITED:
            return True
        if r < 0:
            rate_limited(ex, rt, r, self.header)
            return False
        ex.resp_extra = rate_headers(rt, self.header)
        return True


class Rewrite(Stage):
    """What the upstream request becomes: the path with the route's prefix
    stripped (strip_path), and the method-override field on routes that honour it."""

    name = "rewrite"
    __slots__ = ("prefix", "strip")

    def __init__(self, route, w):
        super().__init__(route, w)
        self.prefix = route.prefix
        self.strip = route.strip_path and route.prefix != b"/"

    @classmethod
    def build(cls, route, w):
        return cls(route, w) if (route.strip_path and route.prefix != b"/") or route.method_override else None

    def run(self, ex) -> bool:
        if self.strip:
            path = ex.path[len(self.prefix):] or b"/"
            ex.up_path = path if path[:1] == b"/" else b"/" + path
        field = ex.head.method_override_field
        if field is not None and self.route.method_override:
            ex.headers = ex.headers + [field]
        return True


class Upstream(Stage):
    """The end of admission: choose the target and hand over to the upstream side."""

    name = "upstream"
    __slots__ = ("upstream",)

    def __init__(self, route, w):
        super().__init__(route, w)
        self.upstream = route.upstream

    def run(self, ex) -> bool:
        self.w.proxy(ex, self.upstream.next_target())
        return True


# The stages compiled per route, in STAGES order (parse, route and log are the
# connection's and the worker's: they run for every request, routed or not).
PER_ROUTE = (ClientIp, IpRules, BodyLimit, KeyCredential, KeyScope, KeyRate, AddressRate, Rewrite, Upstream)


def compile_route(route, w) -> tuple:
    stages = tuple(s for s in (cls.build(route, w) for cls in PER_ROUTE) if s is not None)
    order = [STAGES.index(s.name) for s in stages]
    assert order == sorted(order), f"stages out of order for route {route.name}: {[s.name for s in stages]}"
    return stages


def route_stage(w, ex):
    """Stage 'route': host + longest prefix + methods, with the method a route
    that honours method override checks instead. None: answered."""
    conn = ex.conn
    router = w.router
    route = router.match(host_name(ex.host) if router.by_host and ex.host else None, ex.path)
    if route is None:
        conn.local_reply(ex, "no_route", "no route matches this host and path")
        return None
    ex.route = route
    if route.reject_double_encoding and double_encoded(ex.path):
        conn.local_reply(ex, "bad_request", "double-encoded '.', '/' or '\\' in the path")
        return None
    method = ex.method
    if route.method_override:
        override = ex.head.method_override
        if override is not None:
            method = override.strip()
            if method not in w.method_bits:
                conn.local_reply(ex, "bad_request", "method override names no known method")
                return None
    ex.authz_method = method
    if route.methods is not None and method not in route.methods:
        conn.local_reply(ex, "method_not_allowed", "method not allowed on this route", route.allow_header)
        return None
    return route


def handle(w, ex) -> None:
    """Run one request through the pipeline (the parse stage has run)."""
    route = route_stage(w, ex)
    if route is None:
        return
    for stage in route.stages:
        if not stage.run(ex):
            return


def host_name(authority: bytes) -> bytes:
    """The host of a validated authority, lower-cased, without its port."""
    if authority[:1] == b"[":
        return authority[: authority.find(b"]") + 1].lower()
    return authority.split(b":", 1)[0].lower()


def identity(w, idx: int):
    """(identity header bytes, rate policy id, RateLimit-Policy value, generation,
    (key_id, owner, plan)) per key, cached per record generation: a plan change
    applies on the next request."""
    gen = w.keys.generation(idx)
    hit = w.idcache.get(idx)
    if hit is not None and hit[3] == gen:
        return hit
    key_id, owner, plan, limits = keysync.decode_meta(w.keys.meta(idx))
    hdr = b"x-fastgate-key-id: %s\r\n" % key_id.encode()
    if plan:
        hdr += b"x-fastgate-plan: %s\r\n" % plan.encode()
    if owner:
        # DESIGN names the owner both ways (owner in its interface list,
        # tenant in its key section): send both so either contract holds.
        o = owner.encode("utf-8", "replace")
        hdr += b"x-fastgate-owner: %s\r\nx-fastgate-tenant: %s\r\n" % (o, o)
    policy = w.plan_policies.get(plan)
    if policy is None:  # no plan, or one a reload removed: the key's own limits only
        policy = w.plan_policies[""]
    merged = dict(w.plan_limits.get(plan, {}))
    for lim in limits:
        n, unit = cfg.parse_limit(lim)
        merged[unit] = n
    entry = (hdr, policy, policy_header(merged), gen, (key_id, owner, plan))
    if len(w.idcache) > 100_000:
        w.idcache.clear()
    w.idcache[idx] = entry
    return entry
