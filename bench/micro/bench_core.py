"""bench_core: nanoseconds per call from Python into the core (key check, counter hit, CIDR match,
and a whole keyed request: RateTable.admit() against the check_key + generation + hit_key + 4
attribute reads it replaces).

Run: pytest bench/micro --benchmark-only   (targets: key check <= 1 us, counter <= 200 ns,
CIDR <= 200 ns, a miss after 1M rotations in a 4096-slot index <= 1 us; the 1M-key arena
is ~387 MiB of address space since layout v2, its resident size is reported). Calls go
through itertools.cycle over prebuilt argument lists where the argument varies, which adds
~15-25 ns per call.
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


def _table_for(core, n, million):
    if n == BIG:
        if core is P:
            pytest.skip("1M keys: Cython only (the twin is a reference, not a contender)")
        return million
    return fill(core, n)


def _keys_for(core, n, million):
    return _table_for(core, n, million)[1]


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
    """An address subject: salted (SipHash-2-4) placement in the hashed region."""
    rates = core.RateTable(core.Arena.create(key_capacity=1, rate_capacity=1 << 16))
    pid = rates.policy("bench", windows)
    assert rates.hit(pid, 7, NOW) >= 0
    benchmark.group = "counter hit"
    benchmark(rates.hit, pid, 7, NOW)


@pytest.mark.parametrize("windows", [["100000000/second"], ["100000000/second", "100000000/minute", "100000000/day"]],
                         ids=["1window", "3windows"])
def test_counter_hit_key(benchmark, core, windows):
    """A key's own entry (by index), after check_key cached its limits."""
    arena, keys = fill(core, 1)
    rates = core.RateTable(arena)
    pid = rates.policy("key", windows)
    assert keys.check_key(fast_key(0), GET, b"/", PEER, NOW) == 0
    assert rates.hit_key(pid, keys, 0, NOW) >= 0
    benchmark.group = "counter hit_key"
    benchmark(rates.hit_key, pid, keys, 0, NOW)


@pytest.mark.parametrize("n", [1, BIG], ids=["1key", "1Mkeys"])
@pytest.mark.parametrize("case", ["admit", "admit+5reads", "old"])
def test_keyed_request(benchmark, core, n, case, request):
    """Steps 5-7 for a valid key under a 1-window plan: RateTable.admit() alone; admit() plus
    the five fields a worker reads for its identity cache and RateLimit headers (generation,
    rate, limit, remaining, reset_ms); and the sequence it replaces (check_key, generation,
    hit_key, then limit/remaining/reset_ms/retry_after_ms). Keys drawn at random from n."""
    arena, keys = _table_for(core, n, request.getfixturevalue("million") if n == BIG and core is not P else None)
    rates = core.RateTable(arena)
    pid = rates.policy("key", ["100000000/second"])
    rates.set_plans({"": pid})
    rnd = random.Random(3)
    pool = [fast_key(rnd.randrange(n)) for _ in range(4096)]
    out = core.Admission()
    admit, check, gen, hit_key = rates.admit, keys.check_key, keys.generation, rates.hit_key
    assert all(admit(keys, k, GET, b"/orders/1", PEER, NOW, out) >= 0 for k in pool[:64])
    it = itertools.cycle(pool)
    benchmark.group = f"keyed request {'1 key' if n == 1 else '1M keys'}"
    if case == "admit":
        benchmark(lambda: admit(keys, next(it), GET, b"/orders/1", PEER, NOW, out))
    elif case == "admit+5reads":
        def run():
            if admit(keys, next(it), GET, b"/orders/1", PEER, NOW, out) >= 0:
                return out.generation, out.rate, out.limit, out.remaining, out.reset_ms
        benchmark(run)
    else:
        def run():
            i = check(next(it), GET, b"/orders/1", PEER, NOW)
            if i >= 0:
                gen(i)
                hit_key(pid, keys, i, NOW)
                return rates.limit, rates.remaining, rates.reset_ms, rates.retry_after_ms
        benchmark(run)


def test_addr_subject(benchmark, core):
    pool = [bytes([10, 0, i >> 8, i & 255]) for i in range(2048)] + \
        [bytes.fromhex("20010db8") + i.to_bytes(12, "big") for i in range(2048)]
    it = itertools.cycle(pool)
    f = core.addr_subject
    benchmark.group = "addr_subject"
    benchmark(lambda: f(next(it)))


ROTATIONS = 1_000_000


@pytest.fixture(scope="session")
def rotated():
    """Cython: 512 keys in a 4096-slot index, then 1M rotations without grace (each
    leaves a tombstone; before layout v2 a miss then cost ~4.3 us after only 40k)."""
    from fastgate import _core

    arena = _core.Arena.create(key_capacity=1024, rate_capacity=16)
    keys = _core.KeyTable(arena, secret=SECRET)
    for i in range(512):
        keys.put(i, keys.digest(fast_key(i)))
    rot, dig = keys.rotate, keys.digest
    for r in range(ROTATIONS):
        rot(r & 511, dig(fast_key(10_000_000 + r)), 0)
    return keys


@pytest.mark.parametrize("case", ["digest", "key"])
def test_miss_after_1m_rotations(benchmark, rotated, case):
    keys = rotated
    st = keys.stats()
    pool = [fast_key(50_000_000 + i) for i in range(4096)]
    if case == "digest":
        pool = [keys.digest(k) for k in pool]
        f = keys.check
    else:
        f = keys.check_key
    assert all(f(k, GET, b"/", PEER, NOW) == P.NO_SUCH_KEY for k in pool[:64])
    assert all(keys.check_key(fast_key(10_000_000 + ROTATIONS - 1 - j), GET, b"/", PEER, NOW) >= 0 for j in range(8))
    benchmark.group = "miss after 1M rotations (4096 slots)"
    benchmark.extra_info.update(tombstones=st["tombstones"], rebuilds=st["rebuilds"],
                                max_probes=max(keys.probes(keys.digest(k) if case == "key" else k) for k in pool[:512]))
    it = itertools.cycle(pool)
    benchmark(lambda: f(next(it), GET, b"/", PEER, NOW))


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


def _rss_of_mapping(size: int) -> int | None:
    """Resident bytes of this process's mapping of exactly `size` bytes (the arena), from smaps."""
    want = (size + 4095) // 4096 * 4096
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = hi - lo
            elif head[0] == "Rss:" and cur == want:
                return int(head[1]) * 1024
    return None


def test_arena_size_for_1m_keys(benchmark, million):
    arena = million[0]
    rss = _rss_of_mapping(arena.size)
    benchmark.extra_info["arena_bytes"] = arena.size
    benchmark.extra_info["arena_mib"] = round(arena.size / 2**20, 1)
    benchmark.extra_info["arena_resident_mib"] = None if rss is None else round(rss / 2**20, 1)
    print(f"\narena for 1,000,000 keys: {arena.size} bytes = {arena.size / 2**20:.1f} MiB, "
          f"resident after loading them: {'?' if rss is None else f'{rss / 2**20:.1f} MiB'}")
    assert arena.size <= 400 * 2**20
    benchmark.group = "arena"
    benchmark(lambda: arena.size)


def test_2m_addresses_and_1m_keys_through_a_1m_gateway(benchmark, million):
    """Issue 10: 2M distinct addresses (half v4, half v6 /64s) hit the failed-auth
    policy and an ip_limits policy, then all 1M keys hit their plan in the same
    minute: no key may be refused. Reports how the address regions coped."""
    from fastgate import _core

    arena, keys = million
    rates = _core.RateTable(arena)
    plan = rates.policy("key", ["5/second", "1000/day"])
    ip = rates.policy("ip:route", ["100/minute"])
    fail = rates.policy("authfail", ["30/minute"], on_full="evict")
    subj = _core.addr_subject
    now = NOW - NOW % 60_000 + 1_000
    ip_full = fail_refused = 0
    for i in range(1_000_000):
        a4 = subj(i.to_bytes(4, "big"))
        a6 = subj(bytes.fromhex("2a00") + i.to_bytes(6, "big") + bytes(8))
        if rates.hit(fail, a4, now) < 0:
            fail_refused += 1
        if rates.hit(fail, a6, now) < 0:
            fail_refused += 1
        if rates.hit(ip, a4, now) == _core.RATE_TABLE_FULL:
            ip_full += 1
        if rates.hit(ip, a6, now) == _core.RATE_TABLE_FULL:
            ip_full += 1
    hk = rates.hit_key
    refused = sum(1 for k in range(1_000_000) if hk(plan, keys, k, now) < 0)
    st = rates.stats()
    benchmark.extra_info.update(keys_refused=refused, ip_table_full=ip_full, authfail_refused=fail_refused,
                                evicted=st["evicted"], ip_used=st["used"], auth_used=st["auth_used"])
    print(f"\n2M addresses + 1M keys: keys refused {refused}; ip_limits answered RATE_TABLE_FULL "
          f"{ip_full} times (fail closed, {st['used']} subjects held); failed-auth evictions {st['evicted']}")
    assert refused == 0 and fail_refused == 0
    benchmark.group = "exhaustion"
    benchmark.pedantic(lambda: hk(plan, keys, 123, now), rounds=1, iterations=1)
