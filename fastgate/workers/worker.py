"""A proxy worker process: one uvloop loop serving the inherited listening socket.

The master forks it with the listening socket, the validated config and one end
of a control socketpair. Control messages (length-prefixed): master -> worker
``C`` + msgpack config (reload); worker -> master ``R`` (ready), ``L`` + generation
(reload applied). SIGTERM/SIGINT: stop accepting, finish in-flight, exit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import secrets
import signal
import socket
import struct

import uvloop

from .. import config as cfg
from .. import core
from .. import pipeline
from ..accesslog import AccessLog, AccessRecord
from ..errors import ERROR_STATUS, STAGE_OF
from ..ipfilter import IpRules
from ..server.http1 import error_reply
from .. import _http
from .._http import K_HEAD, K_IDLE, ClientConnection, UpstreamConn
from ..server.routing import Router
from ..upstream.pool import build_groups

log = logging.getLogger("fastgate.worker")

_LEN = struct.Struct("!I")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
def send_msg(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_LEN.pack(len(payload) + 1) + kind + payload)


class MessageReader:
    """Incremental decoder for the control channel's length-prefixed frames."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            frame = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            out.append((frame[:1], frame[1:]))
        return out


class Worker:
    def __init__(self, index: int, config: cfg.Config, sock: socket.socket, ctl: socket.socket,
                 arena=None, secret: bytes | None = None, stats=None):
        self.index = index
        if arena is None:  # a worker on its own (tests, tools): a private arena
            arena = core.Arena.create(key_capacity=16, rate_capacity=1024)
        self.keys = core.KeyTable(arena, secret=secret)
        self.rates = core.RateTable(arena)
        self.idcache: dict = {}
        self.admission = core.Admission()  # the core's answer for a key, reused by every request
        self.method_bits = {m.encode(): core.method_bit(m.encode()) for m in cfg.HTTP_METHODS}
        self.sock = sock
        self.ctl = ctl
        self.loop = None
        self.server = None
        self.conns: set[ClientConnection] = set()
        self.draining = False
        self.now = 0.0
        self.generation = 0
        self.targets: dict = {}
        self.stats = stats
        self.meter = _http.Meter(LATENCY_BUCKETS)  # requests, latency, per-key usage
        self._upstream_seen: dict = {}
        self._next_publish = 0.0
        self.access = None
        self._log_base = [0, 0]
        self.max_connections = 0
        self.conns_refused = 0
        self.upstream_cuts = 0
        self._refuse_logged = 0.0
        self._pending_connects: dict = {}
        self._reader = MessageReader()
        self.apply(config)

    # -- config ---------------------------------------------------------------
    def apply(self, config: cfg.Config) -> None:
        """Swap in a validated config. In-flight exchanges keep the route and
        upstream objects they already hold; pooled connections to targets that
        remain are kept."""
        groups, self.targets = build_groups(config.upstreams, self.targets)
        self.router = Router(config, groups)
        self.ip = IpRules(config.ip)
        self.s = config.server
        self.forwarded_header = config.server.forwarded_header
        key_header = config.keys.header.encode()
        if getattr(self, "key_header", key_header) != key_header:
            for c in self.conns:  # open connections' parsers find the key by the new name too
                if c.parser is not None:
                    c.parser.set_key_header(key_header)
        self.key_header = key_header
        old_log = self.config.log.access if getattr(self, "config", None) else None
        if config.log.access != old_log:
            if self.access is not None:
                self.access.close()  # flushes first
                # keep the counters monotonic across a log that is replaced
                self._log_base[0] += self.access.lines
                self._log_base[1] += self.access.dropped
            self.access = None if config.log.access == "off" else AccessLog(config.log.access)
        self.config = config
        # Rate policies: one counter name for every plan, so a plan change keeps
        # a key's counts; a key's own limits replace its plan's window by window.
        self.plan_limits = {"": {}}
        self.plan_policies = {"": self.rates.policy("key", [], where="keys")}
        for name, plan in config.plans.items():
            self.plan_limits[name] = dict((u, n) for n, u in map(cfg.parse_limit, plan.limits))
            self.plan_policies[name] = self.rates.policy("key", plan.limits, where=f"plans.{name}.limits")
        for route in self.router.routes:
            if route.ip_limits:
                route.ip_policy = self.rates.policy(f"ip:{route.name}", route.ip_limits, where=f"routes.{route.name}")
                route.ip_policy_header = pipeline.policy_header(
                    dict((u, n) for n, u in map(cfg.parse_limit, route.ip_limits)))
        fal = config.keys.failed_auth_limit
        # Failed checks evict the stalest subject when their table is full (it
        # can never fill up); ip_limits (the default) fail closed instead.
        self.authfail_policy = None if fal == "off" else self.rates.policy("authfail", [fal], where="keys",
                                                                            on_full="evict")
        self.v6_prefix = config.ip.v6_subject_prefix
        self.rates.set_plans(self.plan_policies, where="plans")  # "" = no plan, or one this worker lacks
        self.idcache = {}
        for route in self.router.routes:
            route.stages = pipeline.compile_route(route, self)
        timeouts = [config.server.header_timeout, config.server.body_timeout, config.server.keepalive_timeout]
        for u in config.upstreams:
            timeouts += (u.connect_timeout, u.read_timeout, u.idle_timeout)
        self.tick = min(0.5, max(0.02, min(timeouts) / 10))
        self.max_connections = self.connection_cap(config)

    @staticmethod
    def connection_cap(config: cfg.Config) -> int:
        """max_connections, or what RLIMIT_NOFILE allows: every client connection
        may hold one upstream connection, and pooled idle ones and a few files
        need descriptors too."""
        if config.server.max_connections:
            return config.server.max_connections
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        reserve = 64 + sum(u.max_idle * len(u.targets) for u in config.upstreams)
        return max(64, (soft - reserve) // 2)

    def log_exchange(self, ex) -> None:
        """Step 9: the access-log line (only called when the log is on)."""
        d = ex.d
        route = d.route
        key = d.key
        target = d.target
        t = ex.t
        self.access.record(AccessRecord(
            self.access.stamp(),
            ex.request_id,
            d.client or ex.conn.peer,
            ex.head.method.decode("latin-1"),
            ex.path.decode("latin-1"),
            ex.status,
            ex.body_seen,
            ex.bytes_out,
            t.total_us,
            route.name if route is not None else None,
            key[0] if key else None,
            key[1] or None if key else None,
            key[2] or None if key else None,
            target.name if target is not None else None,
            t.upstream_us,
            STAGE_OF.get(ex.error) if ex.error else None,
            ex.error,
        ))

    def log_refused(self, conn, request_id: str, code: str) -> None:
        """A request refused before it became an exchange (malformed head)."""
        self.access.record(AccessRecord(
            time=self.access.stamp(), request_id=request_id, client_ip=conn.peer, method="-", path="-",
            status=ERROR_STATUS[code], bytes_in=0, bytes_out=0, total_us=0, decision="parse", error=code,
        ))

    def is_trusted(self, peer: str) -> bool:
        return self.ip.is_trusted(peer)

    def next_request_id(self) -> str:
        return _http.next_request_id()

    def upstream_counts(self) -> dict:
        """target -> [connects, reuses, connect errors], counted on the targets
        themselves; those a reload dropped keep their last totals here."""
        seen = self._upstream_seen
        for name, t in self.targets.items():
            old = seen.get(name)
            if old is not None and old is not t.counts:  # a target dropped and added back: go on from its totals
                t.counts[:] = [a + b for a, b in zip(old, t.counts)]
            seen[name] = t.counts
        return dict(self._upstream_seen)

    def publish_stats(self) -> None:
        """About once a second: the snapshot for GET /metrics, and usage deltas."""
        stats = self.stats
        if stats is None:
            return
        meter = self.meter
        if meter.usage:
            stats.push_usage(meter.usage)
        stats.publish(self.index, {
            "requests": meter.requests(),
            "latency": meter.latencies(),
            "upstream": self.upstream_counts(),
            "idle": {t.name: len(t.idle) for t in self.targets.values()},
            "connections": len(self.conns),
            "connections_refused": self.conns_refused,
            "upstream_cut": self.upstream_cuts,
            "access_log": [self._log_base[0] + (self.access.lines if self.access is not None else 0),
                           self._log_base[1] + (self.access.dropped if self.access is not None else 0)],
        })

    # -- the decision pipeline (fastgate/pipeline.py) ---------------------------
    def identity(self, idx: int, gen: int):
        return pipeline.identity(self, idx, gen)

    def addr_subject(self, packed: bytes) -> int:
        """The rate subject of a client address: IPv4 by address, IPv6 by its
        prefix (default /64); an unknown address is one shared subject."""
        return core.addr_subject(packed, self.v6_prefix)

    def failed_auth(self, packed: bytes, now_ms: int) -> bool:
        """Count one failed key check for the address (shared by all workers);
        True when it is beyond the limit (the caller answers 429)."""
        if self.authfail_policy is None:
            return False
        return self.rates.hit(self.authfail_policy, self.addr_subject(packed), now_ms) == core.RATE_LIMITED

    # -- connection cap -----------------------------------------------------------
    def shed_idle(self) -> bool:
        """At the cap: close the oldest idle connections (keep-alive ones and
        ones that never sent a byte), a batch at a time. False: none to close."""
        idle = [c for c in self.conns
                if c.active is None and not c.queue and c.upgraded is None and (
                    c.deadline_kind == K_IDLE or (c.deadline_kind == K_HEAD and not c.parser.head_pending))]
        if not idle:
            return False
        idle.sort(key=lambda c: c.idle_since)
        for c in idle[: max(1, len(idle) // 16)]:
            c.abort_silently()
        return True

    def refuse_connection(self, transport) -> None:
        self.conns_refused += 1
        if self.now >= self._refuse_logged:
            self._refuse_logged = self.now + 10.0
            log.warning("worker %d at its connection cap (%d): refusing new connections (%d refused so far)",
                        self.index, self.max_connections, self.conns_refused)
        transport.write(error_reply("overloaded", "too many connections; retry later", self.next_request_id(),
                                    close=True, extra=b"retry-after: 1\r\n"))
        transport.close()

    def connect(self, ex, target) -> None:
        target.counts[0] += 1
        fut = asyncio.ensure_future(
            self.loop.create_connection(functools.partial(UpstreamConn, target), target.host, target.port)
        )
        ex.connecting(fut)
        self._pending_connects[fut] = (ex, self.now + target.connect_timeout)
        fut.add_done_callback(functools.partial(self._connected, ex, target))

    def _connected(self, ex, target, fut) -> None:
        self._pending_connects.pop(fut, None)
        ex.connected(fut, target, self)

    # -- timers -----------------------------------------------------------------
    def _tick(self) -> None:
        loop = self.loop
        self.now = now = loop.time()
        for c in list(self.conns):
            if c.deadline_kind and now >= c.deadline:
                c.on_timeout()
            ex = c.active
            if ex is not None and not c.closed and ex.overdue(now):
                ex.upstream_failed("upstream_timeout", "upstream did not answer in time")
        for fut, (ex, deadline) in list(self._pending_connects.items()):
            if now >= deadline:
                fut.cancel()
        for t in self.targets.values():
            t.expire(now)
        if self.access is not None:
            self.access.flush()
        if now >= self._next_publish:
            self._next_publish = now + 1.0
            self.publish_stats()
        if self.draining and not self.conns:
            self.publish_stats()
            loop.stop()
            return
        loop.call_at(now + self.tick, self._tick)

    # -- control ----------------------------------------------------------------
    def _on_ctl(self) -> None:
        try:
            data = self.ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:  # the master died: as an orderly end
            data = b""
        if not data:
            # The master is gone: nobody will supervise us, stop cleanly.
            self.loop.remove_reader(self.ctl.fileno())
            self.drain()
            return
        for kind, payload in self._reader.feed(data):
            if kind == b"C":
                try:
                    new = cfg.decode(payload)
                    self.apply(new)
                    self.generation += 1
                    send_msg(self.ctl, b"L", str(self.generation).encode())
                except Exception as exc:  # validated by the master; a failure here is a bug
                    log.exception("worker %d could not apply config", self.index)
                    send_msg(self.ctl, b"E", str(exc).encode())

    def _reopen_log(self) -> None:
        if self.access is not None:
            self.access.reopen()

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if c.active is None and c.parsing is None and not c.queue and c.upgraded is None:
                c.close()
        self.loop.call_later(self.s.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        for c in list(self.conns):
            c.abort()
        self.loop.stop()

    def run(self) -> None:
        loop = self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        _http.set_request_id_prefix(secrets.token_hex(4))
        self.now = loop.time()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_log)
        self.ctl.setblocking(False)
        loop.add_reader(self.ctl.fileno(), self._on_ctl)
        self.server = loop.run_until_complete(
            loop.create_server(lambda: ClientConnection(self), sock=self.sock, backlog=self.s.backlog)
        )
        loop.call_at(self.now + self.tick, self._tick)
        self.ctl.setblocking(True)
        send_msg(self.ctl, b"R", str(os.getpid()).encode())
        self.ctl.setblocking(False)
        profile_dir = os.environ.get("FASTGATE_PROFILE_DIR")
        if profile_dir:  # developer aid: cProfile each worker, dump on exit
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        try:
            loop.run_forever()
        finally:
            if self.access is not None:
                self.access.close()
            if profile_dir:
                prof.disable()
                prof.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
            for t in self.targets.values():
                t.close_all()
            loop.close()
