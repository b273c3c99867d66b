"""Per-worker upstream groups: round-robin over targets, keep-alive pool per target."""

from __future__ import annotations

from collections import deque

from ..config import UpstreamConfig, parse_hostport


class Target:
    """One host:port with its idle keep-alive connections (LIFO: warmest first)."""

    __slots__ = ("name", "host", "port", "host_header", "idle", "max_idle", "idle_timeout", "connect_timeout", "read_timeout",
                 "counts")

    def __init__(self, addr: str, uc: UpstreamConfig):
        self.host, self.port = parse_hostport(addr)
        self.name = addr
        self.host_header = addr.encode()
        self.idle: deque = deque()
        self.counts = [0, 0, 0]  # connects, reuses, connect errors (the worker's /metrics; kept across reloads)
        self.apply(uc)

    def apply(self, uc: UpstreamConfig) -> None:
        self.max_idle = uc.max_idle
        self.idle_timeout = uc.idle_timeout
        self.connect_timeout = uc.connect_timeout
        self.read_timeout = uc.read_timeout
        while len(self.idle) > self.max_idle:
            self.idle.popleft().transport.close()

    def get(self):  # (the data plane does this in C: fastgate/http/stages.pxi send())
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn, now: float) -> None:  # (and this: proxy.pxi _pool_put)
        if self.max_idle == 0:
            conn.transport.close()
            return
        conn.idle_until = now + self.idle_timeout
        self.idle.append(conn)
        if len(self.idle) > self.max_idle:
            self.idle.popleft().transport.close()

    def discard(self, conn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def expire(self, now: float) -> None:
        idle = self.idle
        while idle and idle[0].idle_until <= now:
            idle.popleft().transport.close()

    def close_all(self) -> None:
        while self.idle:
            self.idle.pop().transport.close()


class UpstreamGroup:
    __slots__ = ("name", "targets", "_rr", "_n")

    def __init__(self, uc: UpstreamConfig, targets: list[Target]):
        self.name = uc.name
        self.targets = targets
        self._rr = 0
        self._n = len(targets)

    def next_target(self) -> Target:
        if self._n == 1:
            return self.targets[0]
        self._rr = i = (self._rr + 1) % self._n
        return self.targets[i]


def build_groups(upstreams: list[UpstreamConfig], old_targets: dict[str, Target]) -> tuple[dict, dict]:
    """Build groups for a (re)loaded config. Targets with the same address are
    reused so their pooled connections survive a reload."""
    targets: dict[str, Target] = {}
    groups: dict[str, UpstreamGroup] = {}
    for uc in upstreams:
        ts = []
        for addr in uc.targets:
            t = targets.get(addr) or old_targets.get(addr)
            if t is None:
                t = Target(addr, uc)
            else:
                t.apply(uc)
            targets[addr] = t
            ts.append(t)
        groups[uc.name] = UpstreamGroup(uc, ts)
    for addr, t in old_targets.items():
        if addr not in targets:
            t.close_all()
    return groups, targets
