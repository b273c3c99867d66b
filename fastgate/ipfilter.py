"""Global IP rules: deny/allow lists and trusted proxies, decided once per address.

Decisions are cached per address string, so the per-request cost is one dict
lookup; the cache is bounded and rebuilt with the rules on reload.
"""

from __future__ import annotations

import ipaddress

from .config import IpConfig, parse_cidr

_CACHE_MAX = 65_536


def _nets(cidrs: list[str]):
    v4, v6 = [], []
    for c in cidrs:
        n = parse_cidr(c)
        (v4 if n.version == 4 else v6).append(n)
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


def _contains(nets, addr) -> bool:
    v4, v6 = nets
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for n in v4 if addr.version == 4 else v6:
        if addr in n:
            return True
    return False


class IpRules:
    __slots__ = ("allow", "deny", "trusted", "active", "_denied", "_trusted")

    def __init__(self, ic: IpConfig):
        self.allow = _nets(ic.allow) if ic.allow else None
        self.deny = _nets(ic.deny)
        self.trusted = _nets(ic.trusted_proxies)
        self.active = bool(ic.allow or ic.deny)
        self._denied: dict[str, bool] = {}
        self._trusted: dict[str, bool] = {}

    @staticmethod
    def _parse(ip: str):
        try:
            return ipaddress.ip_address(ip.strip())
        except ValueError:
            return None

    def is_trusted(self, ip: str) -> bool:
        r = self._trusted.get(ip)
        if r is None:
            a = self._parse(ip)
            r = a is not None and _contains(self.trusted, a)
            if len(self._trusted) >= _CACHE_MAX:
                self._trusted.clear()
            self._trusted[ip] = r
        return r

    def denied(self, ip: str) -> bool:
        r = self._denied.get(ip)
        if r is None:
            a = self._parse(ip)
            if a is None:
                r = True
            elif _contains(self.deny, a):
                r = True
            else:
                r = self.allow is not None and not _contains(self.allow, a)
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
