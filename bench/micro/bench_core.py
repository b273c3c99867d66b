"""bench_core: nanoseconds per call from Python into the core (key check, counter hit, CIDR match).

Run: pytest bench/micro --benchmark-only   (targets: key check <= 1 us, counter <= 200 ns,
CIDR <= 200 ns, arena <= 256 MiB for 1M keys). Calls go through itertools.cycle over
prebuilt argument lists where the argument varies, which adds ~15-25 ns per call.
"""

import ipaddress
import itertools
import random

import pytest

from fastgate import _core_py as P

SECRET = b"s" * 32
NOW = 1_700_000_000_000
GET = P.method_bit(b"GET")
PEER = bytes([10, 1, 2, 3])
BIG = 1_000_000


def fast_key(i: int) -> bytes:
    body = f"fg_k{i}_".encode() + f"{i:0>32}".encode()
    return body + P.key_checksum(body)


def fill(core, n):
    arena = core.Arena.create(key_capacity=max(n, 1))
    keys = core.KeyTable(arena, secret=SECRET)
    digest = keys.digest
    put = keys.put
    for i in range(n):
        put(i, digest(fast_key(i)))
    return arena, keys


@pytest.fixture(scope="session")
def million():
    from fastgate import _core

    return fill(_core, BIG)


def _keys_for(core, n, million):
    if n == BIG:
        if core is P:
            pytest.skip("1M keys: Cython only (the twin is a reference, not a contender)")
        return million[1]
    return fill(core, n)[1]


@pytest.mark.parametrize("n", [1, BIG], ids=["1key", "1Mkeys"])
@pytest.mark.parametrize("case", ["hit", "miss", "malformed"])
def test_key_check(benchmark, core, n, case, request):
    keys = _keys_for(core, n, request.getfixturevalue("million") if n == BIG and core is not P else None)
    rnd = random.Random(1)
    if case == "hit":
        pool = [fast_key(rnd.randrange(n)) for _ in range(4096)]
        want = lambda r: r >= 0  # noqa: E731
    elif case == "miss":
        pool = [fast_key(BIG + rnd.randrange(BIG)) for _ in range(4096)]
        want = lambda r: r == P.NO_SUCH_KEY  # noqa: E731
    else:
        pool = [k[:-1] + (b"0" if k[-1:] != b"0" else b"1") for k in (fast_key(rnd.randrange(n)) for _ in range(4096))]
        want = lambda r: r == P.KEY_MALFORMED  # noqa: E731
    assert all(want(keys.check_key(k, GET, b"/orders/1", PEER, NOW)) for k in pool[:64])
    it = itertools.cycle(pool)
    check = keys.check_key
    benchmark.group = f"key check_key {case}"
    benchmark(lambda: check(next(it), GET, b"/orders/1", PEER, NOW))


def test_key_check_digest_only(benchmark, core):
    """check() with a precomputed digest: the table part alone."""
    keys = fill(core, 1)[1]
    d = keys.digest(fast_key(0))
    benchmark.group = "key check (digest given)"
    benchmark(keys.check, d, GET, b"/orders/1", PEER, NOW)


@pytest.mark.parametrize("windows", [["100000000/second"], ["100000000/second", "100000000/minute", "100000000/day"]],
                         ids=["1window", "3windows"])
def test_counter_hit(benchmark, core, windows):
    rates = core.RateTable(core.Arena.create(key_capacity=1, rate_capacity=1 << 16))
    pid = rates.policy("bench", windows)
    assert rates.hit(pid, 7, NOW) >= 0
    benchmark.group = "counter hit"
    benchmark(rates.hit, pid, 7, NOW)


def _ranges(version, n):
    rnd = random.Random(version)
    if version == 4:
        return [str(ipaddress.ip_network((rnd.getrandbits(32), 24), strict=False)) for _ in range(n)]
    return [str(ipaddress.ip_network((rnd.getrandbits(128), 64), strict=False)) for _ in range(n)]


@pytest.fixture(scope="session")
def cidr_lists():
    return {4: _ranges(4, 100_000), 6: _ranges(6, 100_000)}


@pytest.mark.parametrize("version", [4, 6], ids=["v4", "v6"])
def test_cidr_contains_100k(benchmark, core, version, cidr_lists):
    s = core.CidrSet.compile(cidr_lists[version], where="bench")
    rnd = random.Random(9)
    width = 4 if version == 4 else 16
    pool = [rnd.getrandbits(8 * width).to_bytes(width, "big") for _ in range(4096)]
    it = itertools.cycle(pool)
    contains = s.contains
    benchmark.group = f"cidr contains 100k {'v4' if version == 4 else 'v6'}"
    benchmark.extra_info["merged_ranges"] = len(s)
    benchmark(lambda: contains(next(it)))


def test_cycle_overhead(benchmark):
    """The cost of the itertools.cycle + lambda harness, to subtract from the figures above."""
    it = itertools.cycle([b"x"] * 4096)
    f = len
    benchmark.group = "harness"
    benchmark(lambda: f(next(it)))


def test_arena_size_for_1m_keys(benchmark, million):
    arena = million[0]
    benchmark.extra_info["arena_bytes"] = arena.size
    benchmark.extra_info["arena_mib"] = round(arena.size / 2**20, 1)
    print(f"\narena for 1,000,000 keys: {arena.size} bytes = {arena.size / 2**20:.1f} MiB")
    assert arena.size <= 256 * 2**20
    benchmark.group = "arena"
    benchmark(lambda: arena.size)
