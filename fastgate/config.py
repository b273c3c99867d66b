"""Typed configuration: TOML or YAML decoded into msgspec Structs.

Every problem is collected and located (``FILE: $.routes[1].upstream: ...``), so
``fastgate check-config`` can report all of them at once, like ``nginx -t``.
Sections are converted one by one (list entries one by one) because msgspec stops
at the first error of a single ``convert`` call.

Limits and CIDRs are fastgate.types' ``Limit``/``Limits`` and ``Cidr``, the types the
admin API and the key store use: the same grammar, the same messages, the same stored
form (a CIDR's host bits cleared, as nginx reads ``10.0.0.1/8``), and nothing accepted
here that the core refuses when a worker compiles it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError
from .types import CIDR, LIMIT, MAX_NAME, NAME, Cidr, Limits, Problems, check_fields, checker
from .urls import check_pg_url, check_redis_url
from .types import LIMIT_UNITS, parse_limit  # noqa: F401  (cfg.parse_limit: the workers' name for it)

Seconds = Annotated[float, Meta(gt=0, le=86_400)]
Size = int | str  # bytes, or "16k" / "10m" / "1g"
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]

HTTP_METHODS = frozenset(
    "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH".split()
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.I)


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size >= 0, found {value}")
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"expected a size like 1048576, '512k', '10m' or '1g', found {value!r}")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def parse_hostport(value: str, *, default_host: str | None = None) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', 'localhost:80', ':8080' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, found {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"expected an IPv6 host in brackets ([::1]:PORT), found {value!r}")
    if not host:
        if default_host is None:
            raise ValueError(f"expected HOST:PORT, found {value!r}")
        host = default_host
    return host, int(port)


def parse_cidr(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """'10.0.0.1/8' -> IPv4Network('10.0.0.0/8'); ValueError as the Cidr rule words it."""
    return ipaddress.ip_network(CIDR(value))


class Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class ServerConfig(Base):
    listen: str = "127.0.0.1:8080"
    workers: Annotated[int, Meta(ge=0, le=256)] = 0  # 0 = one per CPU (at most 256)
    drain_timeout: Seconds = 30.0  # SIGTERM: how long in-flight requests may take
    header_timeout: Seconds = 10.0  # the whole request head must arrive in this; an unused connection is closed
    body_timeout: Seconds = 30.0  # a request body must keep up min_body_rate over each window this long
    min_body_rate: Size = "1k"  # bytes/s, averaged over body_timeout (0: only require some progress)
    keepalive_timeout: Seconds = 60.0  # idle client connection is closed (silently) after this
    # The head is bounded by bytes, as nginx bounds it (its default is 4 x 8k
    # buffers), so real traffic with many small fields fits; the field count is
    # a second, generous bound on per-field work (512 fields: 100 ordinary ones
    # plus Host and the key fit five times over).
    max_header_bytes: Size = "32k"  # header field lines, else 431
    max_headers: Annotated[int, Meta(ge=1, le=10_000)] = 512  # header field lines, else 431
    max_url_bytes: Size = "8k"  # else 414
    max_body_bytes: Size = "100m"  # default per route, else 413; 0 = unlimited
    # Bodies up to this are read and validated whole before any byte goes
    # upstream (nginx's proxy_request_buffering); larger ones stream.
    request_buffer: Size = "64k"
    underscores_in_headers: bool = False  # False: fields with '_' in the name are dropped (nginx's default)
    forwarded_header: bool = False  # also send an RFC 7239 Forwarded field upstream
    max_connections: Annotated[int, Meta(ge=0)] = 0  # per worker; 0 = from RLIMIT_NOFILE minus a reserve
    backlog: Annotated[int, Meta(ge=1)] = 2048

    def __post_init__(self):
        problems: list[str] = []
        _check(problems, "listen", parse_hostport, self.listen)
        for field in ("max_header_bytes", "max_url_bytes", "max_body_bytes", "request_buffer", "min_body_rate"):
            try:
                setattr(self, field, parse_size(getattr(self, field)))
            except ValueError as exc:
                problems.append(f"{field}: {exc}")
        _raise_all(problems)


class AdminConfig(Base):
    listen: str = "127.0.0.1:9901"
    token_env: str = "FASTGATE_ADMIN_TOKEN"

    def __post_init__(self):
        problems: list[str] = []
        _check(problems, "listen", parse_hostport, self.listen)
        _raise_all(problems)


class KeysConfig(Base):
    store: str = "fastgate-data/keys.db"
    header: str = "x-api-key"  # Authorization: Bearer is always accepted too
    capacity: Annotated[int, Meta(ge=16, le=1 << 26)] = 1_000_000  # keys in shared memory
    # Rate counters: every key has its own (sized from capacity, never full);
    # these bound the per-address subjects: route ip_limits (when full they
    # fail closed) and failed key checks (when full the stalest is evicted).
    rate_capacity: Annotated[int, Meta(ge=16, le=1 << 26)] = 1 << 18  # ip_limits address subjects
    auth_capacity: Annotated[int, Meta(ge=16, le=1 << 26)] | None = None  # failed-auth subjects (None: rate_capacity)
    # Shared space for keys' scopes, CIDRs, limits and identity (default: 64 bytes
    # per key of capacity); raise it for many keys with long scope/CIDR lists.
    ext_bytes: Size | None = None
    # Brute-force protection: failed key checks allowed per client address; "off" disables.
    failed_auth_limit: str = "30/minute"
    # Fast start: the admin process keeps a snapshot of the shared key table next to the
    # store and writes it this often while keys change (and at shutdown); a start replays
    # the changes after it instead of loading every key. 0: no snapshot, always a full load.
    snapshot_interval: Annotated[float, Meta(ge=0, le=86_400)] = 30.0

    def __post_init__(self):
        problems: list[str] = []
        if not _TOKEN.match(self.header):
            problems.append(f"header: expected an HTTP header name, found {self.header!r}")
        self.header = self.header.lower()
        if self.failed_auth_limit != "off":
            _check(problems, "failed_auth_limit", LIMIT, self.failed_auth_limit)
        if self.ext_bytes is not None:
            try:
                self.ext_bytes = parse_size(self.ext_bytes)
            except ValueError as exc:
                problems.append(f"ext_bytes: {exc}")
        _raise_all(problems)


class ClusterConfig(Base):
    """``[cluster]``: N gateway nodes as one. ``store`` set = cluster mode: keys and the
    audit trail live in PostgreSQL, shared by every node (``[keys] store`` then only names
    the node's local files: the instance lock and usage.db)."""

    store: str | None = None  # postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    redis: str | None = None  # redis:// or rediss:// (cluster counters and fan-out; validated, not used yet)
    node_id: str | None = None  # default: hostname:port of [server] listen (see node_id())
    ack_timeout: Seconds = 1.0  # how long a cluster write waits for the other nodes' acks
    connect_timeout: Seconds = 5.0  # connecting to PostgreSQL / Redis
    query_timeout: Seconds = 10.0  # one store statement (statement_timeout, lock_timeout)

    def __post_init__(self):
        problems: list[str] = []
        if self.store is not None:
            _check(problems, "store", check_pg_url, self.store)
        if self.redis is not None:
            _check(problems, "redis", check_redis_url, self.redis)
            if self.store is None:
                problems.append("store: expected a postgresql:// URL: cluster mode (redis is set) needs the "
                                "shared store")
        if self.node_id is not None and not _NODE_ID.match(self.node_id):
            problems.append(f"node_id: expected 1..128 letters, digits, '.', '_', '-' or ':', found {self.node_id!r}")
        _raise_all(problems)


def node_id(config: "Config") -> str:
    """This node's id in the cluster: ``[cluster] node_id``, else hostname:port of ``[server] listen``
    (set it explicitly when several nodes share a host and port 0)."""
    if config.cluster.node_id:
        return config.cluster.node_id
    import socket

    port = parse_hostport(config.server.listen)[1]
    return f"{socket.gethostname()}:{port}"


class PlanConfig(Base):
    limits: Limits = []

    def __post_init__(self):
        check_fields(self)


class UpstreamConfig(Base):
    name: Name
    targets: Annotated[list[str], Meta(min_length=1)]
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 60.0  # waiting for response head, and between body reads
    idle_timeout: Seconds = 60.0  # pooled keep-alive connection closed after this
    max_idle: Annotated[int, Meta(ge=0, le=100_000)] = 128  # per target, per worker

    def __post_init__(self):
        problems: list[str] = []
        for i, target in enumerate(self.targets):
            _check(problems, f"targets[{i}]", parse_hostport, target)
        _raise_all(problems)


class RouteConfig(Base):
    name: Name
    path: str
    upstream: str
    methods: list[str] = []  # empty = all methods
    host: str | None = None
    auth: Literal["key", "none"] = "key"
    max_body_bytes: Size | None = None  # None = server.max_body_bytes
    preserve_host: bool = False  # False: Host = upstream target (nginx/Kong default)
    strip_path: bool = False  # True: the matched prefix is removed before proxying
    key_query_param: str | None = None  # opt-in: accept the key from ?PARAM=
    ip_limits: Limits = []  # per client address, e.g. ["100/minute"] (for auth = "none" routes)
    request_buffer: Size | None = None  # None = server.request_buffer
    # Honour X-HTTP-Method-Override / X-HTTP-Method / X-Method-Override: the
    # overridden method is then the one routes and key scopes are checked
    # against, and the field goes upstream. Off: the fields are removed.
    method_override: bool = False
    # Refuse %252e / %252f / %255c (double-encoded '.', '/', '\') with 400.
    # None: refused on key routes, forwarded on open ones.
    reject_double_encoding: bool | None = None

    def __post_init__(self):
        from .server.http1 import normalise_path

        problems: list[str] = []
        if not self.path.startswith("/"):
            problems.append(f"path: expected an absolute path starting with '/', found {self.path!r}")
        else:
            norm = normalise_path(self.path.encode())
            if norm is None or norm.decode() != self.path:
                problems.append(
                    f"path: expected a normalised path (no '//', '.', '..', or needless %-escapes), "
                    f"found {self.path!r}"
                )
        for i, method in enumerate(self.methods):
            if not _TOKEN.match(method) or method.upper() != method:
                problems.append(f"methods[{i}]: expected an upper-case HTTP method, found {method!r}")
        if self.host is not None:
            self.host = self.host.lower()
        for field in ("max_body_bytes", "request_buffer"):
            if getattr(self, field) is not None:
                try:
                    setattr(self, field, parse_size(getattr(self, field)))
                except ValueError as exc:
                    problems.append(f"{field}: {exc}")
        _rules(problems, self)
        _raise_all(problems)


class IpConfig(Base):
    allow: list[Cidr] = []  # empty = everyone not denied
    deny: list[Cidr] = []
    trusted_proxies: list[Cidr] = []
    # Files with one address or CIDR per line ('#' comments), merged into
    # allow/deny when the config is loaded (and on every reload).
    allow_files: list[str] = []
    deny_files: list[str] = []
    # Per-address limits (route ip_limits, failed key checks) count an IPv6
    # client by its /64 (one host is usually given a whole /64), IPv4 by address.
    v6_subject_prefix: Annotated[int, Meta(ge=1, le=64)] = 64

    def __post_init__(self):
        check_fields(self)


class LogConfig(Base):
    access: str = "off"  # a file path, "stdout", or "off"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Per-key usage rollups (usage.db beside the key store): how long rows are kept.
    usage_minute_hours: Annotated[int, Meta(ge=1)] = 48
    usage_hour_days: Annotated[int, Meta(ge=1)] = 90
    usage_day_days: Annotated[int, Meta(ge=0)] = 0  # 0 = forever


class Config(Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    keys: KeysConfig = msgspec.field(default_factory=KeysConfig)
    plans: dict[str, PlanConfig] = {}
    upstreams: list[UpstreamConfig] = []
    routes: list[RouteConfig] = []
    ip: IpConfig = msgspec.field(default_factory=IpConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)


_SECTIONS: dict[str, Any] = {
    "server": ServerConfig,
    "admin": AdminConfig,
    "keys": KeysConfig,
    "ip": IpConfig,
    "log": LogConfig,
    "cluster": ClusterConfig,
}
_LISTS: dict[str, Any] = {"upstreams": UpstreamConfig, "routes": RouteConfig}


_FIELD_MSG = re.compile(r"^([A-Za-z_]+(?:\[\d+\])?): (.*)$", re.S)


def _locate(exc: msgspec.ValidationError, prefix: str) -> list[tuple[str, str]]:
    """msgspec says 'Expected `int`, got `str` - at `$.x`'; re-root the path.
    Our __post_init__ checks raise 'field: message' lines (one per problem),
    which become problems located at that field."""
    text = str(exc)
    msg, sep, at = text.rpartition(" - at `")
    if sep:
        path = prefix + at.rstrip("`")[1:]
    else:
        path, msg = prefix, text
    out = []
    for line in msg.split("\n"):
        m = _FIELD_MSG.match(line)
        if m:
            out.append((f"{path}.{m.group(1)}", m.group(2)))
        else:
            out.append((path, line))
    return out


def _check(problems: list[str], field: str, fn, *args) -> None:
    try:
        fn(*args)
    except ValueError as exc:
        problems.append(f"{field}: {exc}")


def _rules(problems: list[str], obj: msgspec.Struct) -> None:
    """The fastgate.types Rules of obj's fields (full-match patterns, canonical forms)."""
    try:
        check_fields(obj)
    except Problems as exc:
        problems.extend(exc.problems)


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def _convert(value: Any, typ: Any, path: str, problems: list[tuple[str, str]]):
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        found = _locate(exc, path)
    if isinstance(value, dict):
        # msgspec stops at the first error: check field by field, then run the
        # cross-field checks on the fields that were valid, to report them all.
        first, found = found, []
        fields = {f.encode_name: f for f in msgspec.structs.fields(typ)}
        valid = {}
        for key, v in value.items():
            f = fields.get(key)
            if f is None:
                found.append((f"{path}.{key}", f"unknown field {key!r}; expected one of {', '.join(fields)}"))
                continue
            try:
                msgspec.convert(v, f.type)
                valid[key] = v
            except msgspec.ValidationError as exc:
                found.extend(_list_items(v, f.type, f"{path}.{key}") or _locate(exc, f"{path}.{key}"))
        try:
            msgspec.convert(valid, typ)
        except msgspec.ValidationError as exc:
            found.extend(_locate(exc, path))
        found = found or first  # (in document order; the first problem is among them)
    seen = set()
    for p in found:
        if p not in seen and not (p[1].startswith("Object contains unknown field") and p[0] == path):
            seen.add(p)
            problems.append(p)
    return None


def _list_items(value: Any, tp: Any, path: str) -> list[tuple[str, str]]:
    """Every problem of a list whose conversion failed, item by item (msgspec stops at the
    first bad item; the Rules of the others would not run): [] if no item is at fault."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if not isinstance(value, list) or typing.get_origin(tp) is not list:
        return []
    item = typing.get_args(tp)[0]
    rules = checker(item)
    found: list[tuple[str, str]] = []
    for i, v in enumerate(value):
        try:
            v = msgspec.convert(v, item)
        except msgspec.ValidationError as exc:
            found.extend(_locate(exc, f"{path}[{i}]"))
            continue
        if rules is not None:
            lines: list[str] = []
            rules(v, f"{path}[{i}]", lines)
            found.extend(tuple(line.split(": ", 1)) for line in lines)
    return found if any(p.startswith(f"{path}[") for p, _ in found) else []


def build_config(raw: Any, source: str, base_dir: str | None = None) -> Config:
    """Validate a decoded document; raise ConfigError listing every problem."""
    problems: list[tuple[str, str]] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [("$", f"expected a table/mapping at top level, found {type(raw).__name__}")])
    parts: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"$.{key}"
        if key in _SECTIONS:
            parts[key] = _convert(value, _SECTIONS[key], path, problems)
        elif key in _LISTS:
            if not isinstance(value, list):
                problems.append((path, f"expected an array of tables, found {type(value).__name__}"))
                continue
            parts[key] = [_convert(v, _LISTS[key], f"{path}[{i}]", problems) for i, v in enumerate(value)]
        elif key == "plans":
            if not isinstance(value, dict):
                problems.append((path, f"expected a table of plans, found {type(value).__name__}"))
                continue
            for n in value:
                if not isinstance(n, str):  # (YAML: `1:`)
                    why = f"expected a string, found {type(n).__name__}"
                else:
                    why = NAME.problem(n) or (f"expected at most {MAX_NAME} characters, found {len(n)}"
                                              if len(n) > MAX_NAME else None)
                if why:  # keys name their plan with the same rule: such a plan could never be used
                    problems.append((path, f"plan name {n!r}: {why}"))
            parts[key] = {n: _convert(v, PlanConfig, f"{path}.{n}", problems) for n, v in value.items()}
            # Key records name their plan by a 31-bit id of the name (the core
            # picks the plan's limits by it); two names must not share one.
            from ._core_py import plan_id

            ids: dict[int, str] = {}
            for n in value:
                if isinstance(n, str):
                    other = ids.setdefault(plan_id(n), n)
                    if other != n:
                        problems.append((f"{path}.{n}", f"plan name {n!r} has the same plan id as {other!r}; rename one"))
        else:
            problems.append((path, f"unknown section; expected one of {', '.join(sorted([*_SECTIONS, *_LISTS, 'plans']))}"))

    upstream_names: set[str] = set()
    for i, u in enumerate(parts.get("upstreams", [])):
        if u is None:
            continue
        if u.name in upstream_names:
            problems.append((f"$.upstreams[{i}].name", f"duplicate upstream name {u.name!r}"))
        upstream_names.add(u.name)
    route_names: set[str] = set()
    route_keys: set[tuple[str | None, str]] = set()
    raw_routes = raw.get("routes") if isinstance(raw.get("routes"), list) else []
    for i, r in enumerate(parts.get("routes", [])):
        if r is None:
            # Conversion failed; still check the reference so one pass shows all.
            rr = raw_routes[i]
            if isinstance(rr, dict) and isinstance(rr.get("upstream"), str) and rr["upstream"] not in upstream_names:
                known = ", ".join(sorted(upstream_names)) or "none defined"
                problems.append((f"$.routes[{i}].upstream", f"expected the name of an [[upstreams]] entry ({known}), found {rr['upstream']!r}"))
            continue
        if r.name in route_names:
            problems.append((f"$.routes[{i}].name", f"duplicate route name {r.name!r}"))
        route_names.add(r.name)
        if (r.host, r.path) in route_keys:
            problems.append((f"$.routes[{i}].path", f"another route already has host={r.host!r} path={r.path!r}"))
        route_keys.add((r.host, r.path))
        if r.upstream not in upstream_names:
            known = ", ".join(sorted(upstream_names)) or "none defined"
            problems.append((f"$.routes[{i}].upstream", f"expected the name of an [[upstreams]] entry ({known}), found {r.upstream!r}"))

    ip = parts.get("ip")
    if ip is not None and (ip.allow_files or ip.deny_files):
        for field in ("allow", "deny"):
            merged = list(getattr(ip, field))
            for i, name in enumerate(getattr(ip, f"{field}_files")):
                merged += _read_cidr_file(name, base_dir, f"$.ip.{field}_files[{i}]", problems)
            setattr(ip, field, merged)

    if problems:
        raise ConfigError(source, problems)
    return Config(**{k: v for k, v in parts.items()})


def _read_cidr_file(name: str, base_dir: str | None, where: str, problems: list) -> list[str]:
    path = name if os.path.isabs(name) or base_dir is None else os.path.join(base_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append((where, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"))
        return []
    out = []
    for n, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            out.append(CIDR(entry))
        except ValueError as exc:
            problems.append((where, f"{path}:{n}: {exc}"))
    return out


def read_document(path: str) -> Any:
    """Read TOML (default) or YAML (.yaml/.yml) into plain Python data."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, [("$", f"cannot read file: {exc.strerror}")]) from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(path, [("$", f"invalid YAML: {exc}")]) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [("$", f"invalid TOML: {exc}")]) from None


def load_config(path: str) -> Config:
    """Relative file paths in the config (key store, access log) are taken
    relative to the config file's folder, like nginx's include paths, so the
    gateway behaves the same whatever directory it is started from."""
    base = os.path.dirname(os.path.abspath(path))
    config = build_config(read_document(path), path, base)
    if not os.path.isabs(config.keys.store):
        config.keys.store = os.path.join(base, config.keys.store)
    if config.log.access not in ("off", "stdout") and not os.path.isabs(config.log.access):
        config.log.access = os.path.join(base, config.log.access)
    return config


def default_config(data_dir: str, demo_port: int) -> Config:
    """The embedded default: the built-in demo upstream behind an open route
    ('/') and a key route ('/secure'), so the quick start shows both."""
    return Config(
        keys=KeysConfig(store=os.path.join(data_dir, "keys.db")),
        plans={"demo": PlanConfig(limits=["10/second", "1000/day"])},
        upstreams=[UpstreamConfig(name="demo", targets=[f"127.0.0.1:{demo_port}"])],
        routes=[
            RouteConfig(name="demo", path="/", upstream="demo", auth="none"),
            RouteConfig(name="secure", path="/secure", upstream="demo", auth="key"),
        ],
    )


def encode(config: Config) -> bytes:
    return msgspec.msgpack.encode(config)


def decode(data: bytes) -> Config:
    return msgspec.msgpack.decode(data, type=Config)
