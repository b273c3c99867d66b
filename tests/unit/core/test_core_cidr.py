"""CIDR sets: v4/v6, v4-mapped peers, merging, precise errors, differential vs ipaddress."""

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import _core_py as P

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def packed(s):
    return ipaddress.ip_address(s).packed


def test_v4_v6_and_mapped(core):
    s = core.CidrSet.compile(["1.2.3.0/24", "2001:db8::/32", "::ffff:9.9.0.0/112", "8.8.8.8"], where="ip.deny")
    assert s.contains(packed("1.2.3.4")) and s.contains(packed("1.2.3.255"))
    assert not s.contains(packed("1.2.4.0"))
    assert s.contains(packed("::ffff:1.2.3.4"))
    assert s.contains(packed("9.9.1.2")), "a v6 CIDR inside ::ffff:0:0/96 also matches v4 peers"
    assert s.contains(packed("8.8.8.8")) and not s.contains(packed("8.8.8.9"))
    assert s.contains(packed("2001:db8:ffff::1")) and not s.contains(packed("2001:db9::"))
    assert not s.contains(b"") and not s.contains(b"\1\2\3")
    assert s.where == "ip.deny"


def test_merging(core):
    s = core.CidrSet.compile(["10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/24", "10.0.0.0/16", "192.168.0.0/16"])
    assert s.ranges == (2, 0) and len(s) == 2
    e = core.CidrSet.compile([])
    assert len(e) == 0 and not e.contains(packed("1.1.1.1"))


def test_edges(core):
    s = core.CidrSet.compile(["0.0.0.0/32", "255.255.255.255/32", "::/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"])
    assert s.contains(packed("0.0.0.0")) and s.contains(packed("255.255.255.255"))
    assert not s.contains(packed("0.0.0.1")) and not s.contains(packed("255.255.255.254"))
    assert s.contains(packed("::")) and s.contains(packed("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
    assert not s.contains(packed("::1"))
    everything = core.CidrSet.compile(["0.0.0.0/0", "::/0"])
    assert everything.contains(packed("77.1.2.3")) and everything.contains(packed("fe80::1"))


@pytest.mark.parametrize("cidrs,msg", [
    (["1.2.3.0/24", "x"], "cannot parse CIDR 'x' at ip.deny[1]: 'x' does not appear to be an IPv4 or IPv6 network"),
    (["10.0.0.1/24"], "cannot parse CIDR '10.0.0.1/24' at ip.deny[0]: 10.0.0.1/24 has host bits set"),
    (["1.2.3.0/33"], "cannot parse CIDR '1.2.3.0/33' at ip.deny[0]:"),
    ([3], "cannot parse CIDR at ip.deny[0]: expected a string, found int"),
    ("1.2.3.0/24", "cannot parse CIDRs at ip.deny: expected a list of strings, found a single str"),
])
def test_errors(core, cidrs, msg):
    with pytest.raises(P.CoreError) as ei:
        core.CidrSet.compile(cidrs, where="ip.deny")
    assert str(ei.value).startswith(msg)


def reference(nets, addr: bytes) -> bool:
    """What an operator means: a v4-mapped peer is its IPv4 address, and a v6
    network matches every IPv4 address whose mapped form it contains (so
    ::/0 and ::/80 cover all of IPv4, ::ffff:10.0.0.0/104 covers 10/8)."""
    a = ipaddress.ip_address(addr)
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if a.version == 4:
        as_mapped = ipaddress.ip_address((0xFFFF << 32) | int(a))
        return any((n.version == 4 and a in n) or (n.version == 6 and as_mapped in n) for n in nets)
    return any(n.version == 6 and a in n for n in nets)


@pytest.mark.parametrize("rule,v4,inside", [
    ("::/0", "203.0.113.9", True),
    ("::/80", "203.0.113.9", True),
    ("::fffe:0:0/95", "1.1.1.1", True),
    ("::ffff:128.0.0.0/97", "200.1.1.1", True),
    ("::ffff:128.0.0.0/97", "100.1.1.1", False),
    ("::/96", "1.1.1.1", False),
    ("2001:db8::/32", "1.1.1.1", False),
])
def test_wide_v6_rules_match_mapped_and_v4_clients(core, rule, v4, inside):
    s = core.CidrSet.compile([rule])
    assert s.contains(packed(v4)) is inside
    assert s.contains(packed("::ffff:" + v4)) is inside


@pytest.mark.parametrize("rule", ["fe80::1%eth0/128", "fe80::%eth0/64", "fe80::1%1"])
def test_zone_ids_are_refused(core, rule):
    with pytest.raises(P.CoreError) as ei:
        core.CidrSet.compile(["10.0.0.0/8", rule], where="keys.k1.allow_cidrs")
    assert str(ei.value) == f"cannot parse CIDR {rule!r} at keys.k1.allow_cidrs[1]: zone ids ('%...') are not allowed in address rules"


v4net = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32))
v6net = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128))
mapped_net = st.builds(
    lambda a, p: ipaddress.ip_network(((0xFFFF << 32) | a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(96, 128)
)
addr4 = st.integers(0, 2**32 - 1).map(lambda x: x.to_bytes(4, "big"))
addr6 = st.integers(0, 2**128 - 1).map(lambda x: x.to_bytes(16, "big"))
addr_mapped = st.integers(0, 2**32 - 1).map(lambda x: ((0xFFFF << 32) | x).to_bytes(16, "big"))


@HYP
@given(st.lists(st.one_of(v4net, v6net, mapped_net), max_size=30), st.data())
def test_differential_vs_ipaddress(core, nets, data):
    s = core.CidrSet.compile([str(n) for n in nets])
    probes = data.draw(st.lists(st.one_of(addr4, addr6, addr_mapped), min_size=1, max_size=20))
    # also probe range edges, where off-by-one errors live
    for n in nets[:5]:
        for x in (int(n.network_address), int(n.broadcast_address)):
            for y in (x - 1, x, x + 1):
                if n.version == 4 and 0 <= y < 2**32:
                    probes.append(y.to_bytes(4, "big"))
                elif n.version == 6 and 0 <= y < 2**128:
                    probes.append(y.to_bytes(16, "big"))
    for p in probes:
        assert s.contains(p) == reference(nets, p), (nets, ipaddress.ip_address(p))


def test_large_set(core):
    nets = [f"{(i >> 8) & 255}.{i & 255}.{(i * 7) & 255}.0/24" for i in range(0, 100_000, 7)]
    s = core.CidrSet.compile(nets)
    ref = [ipaddress.ip_network(n) for n in nets]
    for probe in ("0.0.0.5", "1.2.14.9", "3.3.3.3", "255.255.255.255", "10.100.188.1"):
        assert s.contains(packed(probe)) == reference(ref, packed(probe))
