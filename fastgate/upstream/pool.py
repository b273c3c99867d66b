"""Per-worker upstream groups: round-robin over targets, keep-alive pool per target."""

from __future__ import annotations

from .._http import Target
from ..config import UpstreamConfig

__all__ = ["Target", "UpstreamGroup", "build_groups"]


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
