"""Issue 10 item 2: no rate table an attacker can fill.

* keys count in an entry of their own (one per key index): they are never
  refused for lack of space, whatever floods the address regions;
* address subjects reuse expired entries; a "refuse" policy (ip_limits) fails
  closed when a probe window is full, an "evict" policy (failed auth) takes
  the stalest entry instead, in a region of its own;
* a reused key index starts from zero; an updated key keeps its counts;
* addr_subject aggregates IPv6 per prefix and IPv4-mapped as IPv4.
"""

import ipaddress

import pytest
from corehelp import SECRET, T0

from fastgate import _core_py as P

MIN = 60_000


def packed(s):
    return ipaddress.ip_address(s).packed


def test_keys_past_the_rate_capacity_get_correct_limits(core):
    """Many more keys than address entries, after floods of both address regions."""
    a = core.Arena.create(key_capacity=300, rate_capacity=16, auth_capacity=16)
    keys = core.KeyTable(a, secret=SECRET)
    rates = core.RateTable(a)
    plan = rates.policy("key", ["3/minute"])
    ip = rates.policy("ip:r", ["5/minute"])
    authfail = rates.policy("authfail", ["30/minute"], on_full="evict")
    for s in range(2000):  # bad-key flood from 2000 addresses, and an ip_limits flood
        assert rates.hit(authfail, P.SUBJECT_V4 | s, T0) >= 0
        rates.hit(ip, P.SUBJECT_V4 | s, T0)
    assert rates.hit(ip, P.SUBJECT_V4 | 5000, T0) == P.RATE_TABLE_FULL, "ip_limits fail closed"
    ks = [P.make_key(f"k{i}").encode() for i in range(300)]
    for i, k in enumerate(ks):
        keys.put(i, keys.digest(k), limits=["2/minute"] if i % 2 else None)
    for i, k in enumerate(ks):
        assert keys.check_key(k, 1, b"/", b"", T0) == i
        want = [1, 0] if i % 2 else [2, 1, 0]
        assert [rates.hit_key(plan, keys, i, T0) for _ in want] == want, i
        assert rates.hit_key(plan, keys, i, T0) == P.RATE_LIMITED
        assert rates.limit == (2 if i % 2 else 3)
    st = rates.stats()
    assert st["used"] == 16 and st["auth_used"] == 16 and st["evicted"] > 0


def test_hit_key_rejects_a_bad_index(core, keys, rates):
    plan = rates.policy("key", ["3/minute"])
    for bad in (-1, 64):
        with pytest.raises(P.CoreError, match=r"key index must be 0\.\.63"):
            rates.hit_key(plan, keys, bad, T0)


def test_evict_policy_is_never_full_and_keeps_the_active(core):
    a = core.Arena.create(key_capacity=1, rate_capacity=64, auth_capacity=64)
    rates = core.RateTable(a)
    fail = rates.policy("authfail", ["3/minute"], on_full="evict")
    hot = P.SUBJECT_V4 | 7
    t = T0 - T0 % MIN
    assert [rates.hit(fail, hot, t) for _ in range(3)] == [2, 1, 0]
    for s in range(1000, 1063):  # fills the other 63 entries
        assert rates.hit(fail, P.SUBJECT_V4 | s, t + s - 999) == 2
    assert rates.hit(fail, hot, t + 100) == P.RATE_LIMITED  # hot is now the most recent
    for s in range(2000, 2050):  # each new subject evicts the stalest entry
        assert rates.hit(fail, P.SUBJECT_V4 | s, t + 200 + s) == 2
    assert rates.hit(fail, hot, t + 5000) == P.RATE_LIMITED, "the active subject kept its count"
    assert rates.hit(fail, P.SUBJECT_V4 | 1000, t + 5000) == 2, "the stalest was evicted: it starts again"
    assert rates.stats()["evicted"] >= 50 and rates.stats()["auth_used"] == 64


def test_auth_flood_cannot_make_ip_limits_fail_closed(core):
    a = core.Arena.create(key_capacity=1, rate_capacity=64, auth_capacity=64)
    rates = core.RateTable(a)
    fail = rates.policy("authfail", ["30/minute"], on_full="evict")
    ip = rates.policy("ip:r", ["10/minute"])
    for s in range(5000):
        assert rates.hit(fail, P.SUBJECT_V4 | s, T0) >= 0
    assert all(rates.hit(ip, P.SUBJECT_V4 | s, T0) == 9 for s in range(64))
    assert rates.stats()["used"] == 64


def test_unknown_policy_mode(core, rates):
    with pytest.raises(P.CoreError, match="on_full must be 'refuse' or 'evict', found 'open'"):
        rates.policy("p", ["1/second"], on_full="open")


def test_reused_key_index_starts_from_zero_and_updates_keep_counts(core, keys, rates):
    plan = rates.policy("key", ["2/minute"])
    k1 = P.make_key("one").encode()
    keys.put(3, keys.digest(k1))
    assert [rates.hit_key(plan, keys, 3, T0) for _ in range(3)] == [1, 0, P.RATE_LIMITED]
    keys.put(3, keys.digest(k1), plan_id=4, limits=["3/minute"])  # an update: same key
    assert rates.hit_key(plan, keys, 3, T0) == 0, "the update kept the two counted hits"
    assert keys.delete(3)
    k2 = P.make_key("two").encode()
    keys.put(3, keys.digest(k2))  # a new key in the same index
    assert keys.check_key(k2, 1, b"/", b"", T0) == 3
    assert [rates.hit_key(plan, keys, 3, T0) for _ in range(2)] == [1, 0]


@pytest.mark.parametrize("addr,prefix,want", [
    ("192.0.2.7", 64, P.SUBJECT_V4 | 0xC0000207),
    ("::ffff:192.0.2.7", 64, P.SUBJECT_V4 | 0xC0000207),
    ("2001:db8:1:2:3:4:5:6", 64, 0x20010DB800010002),
    ("2001:db8:1:2:ffff::1", 64, 0x20010DB800010002),
    ("2001:db8:1:2:3:4:5:6", 48, 0x20010DB800010000),
    ("2001:db8:1:2:3:4:5:6", 1, 0),
    ("::1", 64, 0),
])
def test_addr_subject(core, addr, prefix, want):
    assert core.addr_subject(packed(addr), prefix) == want
    assert P.addr_subject(packed(addr), prefix) == want


def test_addr_subject_unknown_and_errors(core):
    assert core.addr_subject(b"") == core.addr_subject(b"\1\2\3") == P.SUBJECT_UNKNOWN
    assert core.addr_subject(packed("2001:db8::1")) == core.addr_subject(packed("2001:db8::2")), "default /64"
    assert core.addr_subject(packed("10.0.0.1")) != core.addr_subject(packed("10.0.0.2"))
    for bad in (0, 65, 128):
        with pytest.raises(P.CoreError, match=f"v6_prefix must be 1..64, found {bad}"):
            core.addr_subject(packed("::1"), bad)


def test_one_v6_network_is_one_subject(core):
    """2**64 addresses of one /64 cannot be 2**64 subjects: they share a limit."""
    rates = core.RateTable(core.Arena.create(key_capacity=1, rate_capacity=16))
    ip = rates.policy("ip:r", ["5/minute"])
    base = int(ipaddress.ip_address("2001:db8:aa:bb::"))
    got = [rates.hit(ip, core.addr_subject((base + i * 7919).to_bytes(16, "big")), T0) for i in range(7)]
    assert got == [4, 3, 2, 1, 0, P.RATE_LIMITED, P.RATE_LIMITED]


def test_salted_placement_differs_per_arena():
    """Cython only: the same subjects fill different probe windows in two arenas,
    so no offline search can pick subjects that collide in every gateway."""
    C = pytest.importorskip("fastgate._core")

    def first_refused():
        rates = C.RateTable(C.Arena.create(key_capacity=1, rate_capacity=512))
        ip = rates.policy("ip:r", ["1/minute"])
        for s in range(100_000):
            if rates.hit(ip, P.SUBJECT_V4 | s, T0) == P.RATE_TABLE_FULL:
                return s
        return None

    seen = {first_refused() for _ in range(4)}
    assert None not in seen and len(seen) > 1
