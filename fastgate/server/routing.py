"""Route table compiled once per config: host, longest path prefix, methods."""

from __future__ import annotations

from ..config import Config, RouteConfig


class Route:
    __slots__ = (
        "name",
        "prefix",
        "host",
        "methods",
        "allow_header",
        "upstream",
        "auth",
        "max_body",
        "preserve_host",
        "strip_path",
        "key_query_param",
        "ip_limits",
        "ip_policy",
        "ip_policy_header",
        "request_buffer",
        "method_override",
        "reject_double_encoding",
        "stages",
    )

    def __init__(self, rc: RouteConfig, upstream, default_max_body: int, default_buffer: int = 65536):
        self.name = rc.name
        p = rc.path.encode()
        # Stored without a trailing slash so '/api' and '/api/' both cover '/api/x'.
        self.prefix = p.rstrip(b"/") or b"/"
        self.host = rc.host.encode() if rc.host else None
        self.methods = frozenset(m.encode() for m in rc.methods) or None
        self.allow_header = (
            b"allow: " + b", ".join(sorted(self.methods)) + b"\r\n" if self.methods else b""
        )
        self.upstream = upstream
        self.auth = rc.auth
        mb = rc.max_body_bytes if rc.max_body_bytes is not None else default_max_body
        self.max_body = mb or (1 << 62)
        self.preserve_host = rc.preserve_host
        self.strip_path = rc.strip_path
        self.key_query_param = rc.key_query_param.encode() if rc.key_query_param else None
        self.ip_limits = rc.ip_limits
        self.ip_policy = None  # set by the worker, which owns the rate table
        self.ip_policy_header = b""
        self.request_buffer = rc.request_buffer if rc.request_buffer is not None else default_buffer
        self.method_override = rc.method_override
        rd = rc.reject_double_encoding
        self.reject_double_encoding = rc.auth != "none" if rd is None else rd
        self.stages = ()  # compiled by the worker (fastgate/pipeline.py), which owns the tables they use


class Router:
    """Longest-prefix match on segment boundaries: '/orders' matches '/orders'
    and '/orders/7' but never '/ordersX'. Host-specific routes win over
    host-agnostic ones. Lookup walks the path's own prefixes through a dict, so
    it costs O(path segments), not O(routes)."""

    __slots__ = ("by_host", "any_host", "routes")

    def __init__(self, config: Config, upstreams: dict):
        default_max = config.server.max_body_bytes
        buf = config.server.request_buffer
        self.routes = [Route(rc, upstreams[rc.upstream], default_max, buf) for rc in config.routes]
        self.by_host: dict[bytes, dict[bytes, Route]] = {}
        self.any_host: dict[bytes, Route] = {}
        for r in self.routes:
            table = self.by_host.setdefault(r.host, {}) if r.host else self.any_host
            table[r.prefix] = r

    @staticmethod
    def _walk(table: dict, path: bytes):
        get = table.get
        p = path
        while True:
            r = get(p)
            if r is not None:
                return r
            i = p.rfind(b"/")
            if i <= 0:
                return get(b"/")
            p = p[:i]

    def match(self, host: bytes | None, path: bytes):
        if self.by_host and host:
            table = self.by_host.get(host)
            if table is not None:
                r = self._walk(table, path)
                if r is not None:
                    return r
        if self.any_host:
            return self._walk(self.any_host, path)
        return None
