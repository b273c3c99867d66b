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
import secrets
import signal
import socket
import struct

import uvloop

from .. import config as cfg
from ..ipfilter import IpRules
from ..server.protocol import ClientConnection
from ..server.routing import Router
from ..upstream.client import UpstreamConn
from ..upstream.pool import build_groups

log = logging.getLogger("fastgate.worker")

_LEN = struct.Struct("!I")


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
    def __init__(self, index: int, config: cfg.Config, sock: socket.socket, ctl: socket.socket):
        self.index = index
        self.sock = sock
        self.ctl = ctl
        self.loop = None
        self.server = None
        self.conns: set[ClientConnection] = set()
        self.draining = False
        self.now = 0.0
        self.generation = 0
        self.targets: dict = {}
        self._rid_prefix = ""
        self._rid = 0
        self.status_counts: dict = {}
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
        self.key_header = config.keys.header.encode()
        self.config = config
        timeouts = [config.server.header_timeout, config.server.body_timeout, config.server.keepalive_timeout]
        for u in config.upstreams:
            timeouts += (u.connect_timeout, u.read_timeout, u.idle_timeout)
        self.tick = min(0.5, max(0.02, min(timeouts) / 10))

    def is_trusted(self, peer: str) -> bool:
        return self.ip.is_trusted(peer)

    def next_request_id(self) -> str:
        self._rid += 1
        return f"{self._rid_prefix}{self._rid:08x}"

    def count_status(self, status) -> None:
        c = self.status_counts
        c[status] = c.get(status, 0) + 1

    # -- the decision pipeline (DESIGN.md order) --------------------------------
    def handle(self, ex) -> None:
        conn = ex.conn
        router = self.router
        route = router.match(ex.host.lower().split(b":", 1)[0] if router.by_host and ex.host else None, ex.path)
        if route is None:
            conn.local_reply(ex, "no_route", "no route matches this host and path")
            return
        ex.route = route
        if route.methods is not None and ex.method not in route.methods:
            conn.local_reply(ex, "method_not_allowed", "method not allowed on this route", route.allow_header)
            return
        ip = self.ip
        if ip.active:
            client = ip.client_ip(conn.peer, conn.trusted, ex.xff) if conn.trusted else conn.peer
            if ip.denied(client):
                conn.local_reply(ex, "ip_denied", "client address is not allowed")
                return
        if route.auth == "key":
            # Issue "custom API keys" wires the key table in; until then a key
            # route is closed: no key -> key_missing, any key -> key_invalid.
            if self._find_key(ex) is None:
                conn.local_reply(ex, "key_missing", "this route needs an API key", b"www-authenticate: Bearer\r\n")
            else:
                conn.local_reply(ex, "key_invalid", "API key not recognised", b"www-authenticate: Bearer\r\n")
            return
        if ex.length is not None and ex.length > route.max_body:
            conn.local_reply(ex, "body_too_large", f"request body exceeds {route.max_body} bytes")
            return
        self.proxy(ex, route.upstream.next_target())

    def _find_key(self, ex):
        kh = self.key_header
        for ln, _, value in ex.headers:
            if ln == kh:
                return value
            if ln == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip()
        return None

    def build_head(self, ex, target) -> bytes:
        route = ex.route
        path = ex.path
        if route.strip_path and route.prefix != b"/":
            path = path[len(route.prefix) :] or b"/"
            if path[:1] != b"/":
                path = b"/" + path
        conn = ex.conn
        peer = conn.peer.encode()
        xff = ex.xff + b", " + peer if conn.trusted and ex.xff else peer
        host = ex.host or b""
        parts = [
            ex.method,
            b" ",
            path,
            ex.query,
            b" HTTP/1.1\r\nhost: ",
            host if route.preserve_host and host else target.host_header,
            b"\r\n",
        ]
        for _, name, value in ex.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"x-forwarded-for: ",
            xff,
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ",
            host,
            b"\r\nx-request-id: ",
            ex.request_id.encode(),
            b"\r\n",
        )
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif ex.length is not None:
            parts.append(b"content-length: %d\r\n" % ex.length)
        if ex.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", ex.upgrade, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def proxy(self, ex, target) -> None:
        up = target.get() if ex.upgrade is None else None
        if up is not None:
            ex.conn.send_upstream(ex, up, self.build_head(ex, target))
            return
        self.connect(ex, target)

    def connect(self, ex, target) -> None:
        fut = asyncio.ensure_future(
            self.loop.create_connection(functools.partial(UpstreamConn, target), target.host, target.port)
        )
        ex.up = None
        ex.up_head = fut
        deadline = self.now + target.connect_timeout
        fut.add_done_callback(functools.partial(self._connected, ex, target, deadline))
        self._pending_connects[fut] = (ex, deadline)

    def _connected(self, ex, target, deadline, fut) -> None:
        self._pending_connects.pop(fut, None)
        conn = ex.conn
        if fut.cancelled():
            if not conn.closed and conn.active is ex and not ex.done:
                ex.up_head = None
                conn.upstream_failed(ex, "upstream_timeout", f"connecting to {target.host}:{target.port} timed out")
            return
        exc = fut.exception()
        if exc is not None:
            ex.up_head = None
            if not conn.closed and conn.active is ex and not ex.done:
                conn.upstream_failed(ex, "upstream_unavailable", f"cannot connect to upstream {target.host}:{target.port}")
            return
        _, up = fut.result()
        if conn.closed or conn.active is not ex or ex.done:
            ex.up_head = None
            up.transport.close()
            return
        conn.send_upstream(ex, up, self.build_head(ex, target))

    # -- timers -----------------------------------------------------------------
    def _tick(self) -> None:
        loop = self.loop
        self.now = now = loop.time()
        for c in list(self.conns):
            if c.deadline_kind and now >= c.deadline:
                c.on_timeout()
            ex = c.active
            if ex is not None and not ex.done and not c.closed:
                up = ex.up
                if up is not None and now >= up.deadline:
                    c.upstream_failed(ex, "upstream_timeout", "upstream did not answer in time")
        for fut, (ex, deadline) in list(self._pending_connects.items()):
            if now >= deadline:
                fut.cancel()
        for t in self.targets.values():
            t.expire(now)
        if self.draining and not self.conns:
            loop.stop()
            return
        loop.call_at(now + self.tick, self._tick)

    # -- control ----------------------------------------------------------------
    def _on_ctl(self) -> None:
        try:
            data = self.ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
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
        self._pending_connects = {}
        self._rid_prefix = secrets.token_hex(4)
        self._reader = MessageReader()
        self.now = loop.time()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
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
            if profile_dir:
                prof.disable()
                prof.dump_stats(os.path.join(profile_dir, f"worker-{os.getpid()}.prof"))
            for t in self.targets.values():
                t.close_all()
            loop.close()
