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

A stage is a small object (a subclass of ``Stage``) with ``name`` and ``run(ex) -> bool``: True lets the
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

from . import config as cfg
from ._http import (  # noqa: F401  (Stage, handle and host_name are part of this module's interface)
    AddressRate, BodyLimit, ClientIp, IpRules, KeyCredential, KeyRate, KeyScope, Rewrite, Stage, Upstream, handle,
    host_name,
)
from .admin import keysync

STAGES = ("parse", "route", "client_ip", "ip", "limits", "key", "scope", "rate", "rewrite", "upstream", "log")

_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400, "month": 2_592_000}


def policy_header(limits: dict[str, int]) -> bytes:
    """RateLimit-Policy (IETF httpapi draft): '10;w=1, 1000;w=86400'."""
    if not limits:
        return b""
    items = sorted(limits.items(), key=lambda kv: _WINDOW_SECONDS[kv[0]])
    return b"ratelimit-policy: " + ", ".join(f"{n};w={_WINDOW_SECONDS[u]}" for u, n in items).encode() + b"\r\n"


# The stages compiled per route, in STAGES order (parse, route and log are the
# connection's and the worker's: they run for every request, routed or not).
# The built-in ones are Cython classes (fastgate/http/stages.pxi).
PER_ROUTE = (ClientIp, IpRules, BodyLimit, KeyCredential, KeyScope, KeyRate, AddressRate, Rewrite, Upstream)


def compile_route(route, w) -> tuple:
    stages = tuple(s for s in (cls.build(route, w) for cls in PER_ROUTE) if s is not None)
    order = [STAGES.index(s.name) for s in stages]
    assert order == sorted(order), f"stages out of order for route {route.name}: {[s.name for s in stages]}"
    return stages


def identity(w, idx: int, gen: int):
    """(identity header bytes, None, RateLimit-Policy value, generation,
    (key_id, owner, plan)) per key, cached per record generation (which admit()
    reports): a plan change applies on the next request."""
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
    merged = dict(w.plan_limits.get(plan, {}))
    for lim in limits:
        n, unit = cfg.parse_limit(lim)
        merged[unit] = n
    entry = (hdr, None, policy_header(merged), gen, (key_id, owner, plan))
    if len(w.idcache) > 100_000:
        w.idcache.clear()
    w.idcache[idx] = entry
    return entry
