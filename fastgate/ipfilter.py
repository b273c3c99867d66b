"""Global IP rules: deny/allow lists (the core's CidrSet, O(log n) over merged
ranges) and trusted proxies, decided once per address string.

Decisions are cached per address, so the per-request cost is one dict lookup;
the cache is bounded and rebuilt with the rules on reload.
"""

from __future__ import annotations

import socket

from . import core
from .config import IpConfig

_CACHE_MAX = 65_536


def pack_ip(ip: str) -> bytes:
    """'1.2.3.4' -> 4 bytes, '::1' -> 16 bytes, anything else -> b''."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip.strip())
    except (OSError, ValueError):
        return b""


class IpRules:
    __slots__ = ("allow", "deny", "trusted", "active", "_denied", "_trusted")

    def __init__(self, ic: IpConfig):
        self.allow = core.CidrSet.compile(ic.allow, "ip.allow") if ic.allow else None
        self.deny = core.CidrSet.compile(ic.deny, "ip.deny")
        self.trusted = core.CidrSet.compile(ic.trusted_proxies, "ip.trusted_proxies")
        self.active = bool(ic.allow or ic.deny)
        self._denied: dict[str, bool] = {}
        self._trusted: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        r = self._trusted.get(ip)
        if r is None:
            packed = pack_ip(ip)
            r = bool(packed) and self.trusted.contains(packed)
            if len(self._trusted) >= _CACHE_MAX:
                self._trusted.clear()
            self._trusted[ip] = r
        return r

    def denied(self, ip: str) -> bool:
        r = self._denied.get(ip)
        if r is None:
            packed = pack_ip(ip)
            if not packed:
                r = True  # not an address: never let it through an IP rule
            elif self.deny.contains(packed):
                r = True
            else:
                r = self.allow is not None and not self.allow.contains(packed)
            if len(self._denied) >= _CACHE_MAX:
                self._denied.clear()
            self._denied[ip] = r
        return r

    def client_ip(self, peer: str, peer_trusted: bool, xff: bytes | None) -> str:
        """The peer, or when the peer is a trusted proxy, the right-most
        X-Forwarded-For entry that is not itself a trusted proxy."""
        if not peer_trusted or not xff:
            return peer
        ip = peer
        for part in reversed(xff.split(b",")):
            ip = part.strip().decode("latin-1")
            if not self.is_trusted(ip):
                return ip
        return ip
