"""Key table: lookup, lifecycle, scopes, per-key CIDRs, rotation, capacity."""

import os

import pytest
from corehelp import SECRET, T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import _core_py as P
from fastgate.core import method_bit

GET, POST = method_bit(b"GET"), method_bit(b"POST")
V4 = bytes([10, 1, 2, 3])
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_hit_returns_index_and_plan(keys, new_key):
    key = new_key(5, plan_id=9)
    assert keys.check_key(key, GET, b"/x", V4, T0) == 5
    assert keys.last_plan == 9
    assert keys.check(keys.digest(key), GET, b"/x", V4, T0) == 5


def test_miss_and_malformed(core, keys, new_key):
    key = new_key(1)
    other = P.make_key("zz").encode()
    assert keys.check_key(other, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check(b"\0" * 32, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check(b"short", GET, b"/", V4, T0) == core.NO_SUCH_KEY
    bad_check = key[:-1] + (b"A" if key[-1:] != b"A" else b"B")
    for bad in (b"", b"fg_", bad_check, key.replace(b"fg_", b"fx_"), key + b"0", b"fg_k1_" + b"a" * 40):
        assert keys.check_key(bad, GET, b"/", V4, T0) == core.KEY_MALFORMED


def test_check_key_without_secret_is_malformed(core, arena):
    t = core.KeyTable(arena)
    assert t.check_key(P.make_key("a").encode(), GET, b"/", V4, T0) == core.KEY_MALFORMED
    with pytest.raises(P.CoreError, match="no server secret"):
        t.digest(b"x")


def test_secret_validation(core, arena):
    with pytest.raises(P.CoreError, match=r"server secret must be 1\.\.64 bytes, found 65 bytes"):
        core.KeyTable(arena, secret=b"x" * 65)


@pytest.mark.parametrize("n", [1, 27, 64, 127, 128, 129, 256, 300])
def test_digest_matches_hashlib(keys, n):
    msg = bytes(range(256))[:n] if n <= 256 else b"q" * n
    assert keys.digest(msg) == P.key_digest(SECRET, msg)


@HYP
@given(st.binary(min_size=1, max_size=400), st.binary(min_size=1, max_size=64))
def test_digest_differential(core, msg, secret):
    t = core.KeyTable(core.Arena.create(key_capacity=1, rate_capacity=1), secret=secret)
    assert t.digest(msg) == P.key_digest(secret, msg)


@HYP
@given(st.data())
def test_key_shape_differential(core, data):
    """The C shape check and the Python one agree on mutated keys."""
    t = core.KeyTable(core.Arena.create(key_capacity=1, rate_capacity=1), secret=SECRET)
    key = bytearray(P.make_key(data.draw(st.text("abcXYZ019", min_size=1, max_size=32))).encode()
                    if data.draw(st.booleans()) else b"fg_abc_" + b"A" * 30)
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["set", "del", "ins"]))
        if op == "set" and key:
            key[data.draw(st.integers(0, len(key) - 1))] = data.draw(st.sampled_from(b"_aZ9-\x00f"))
        elif op == "del" and key:
            del key[data.draw(st.integers(0, len(key) - 1))]
        else:
            key.insert(data.draw(st.integers(0, len(key))), data.draw(st.sampled_from(b"_aZ9")))
    key = bytes(key)
    got = t.check_key(key, GET, b"/", V4, T0)
    assert (got == core.KEY_MALFORMED) == (not P.key_well_formed(key))


def test_make_key_shape():
    k = P.make_key("abc123")
    assert k.startswith("fg_abc123_") and P.key_well_formed(k.encode())
    assert P.key_id_of(k.encode()) == b"abc123"
    with pytest.raises(P.CoreError, match="key id must be"):
        P.make_key("a_b")


def test_revoke_disable_expiry(core, keys, new_key):
    key = new_key(2, not_before_ms=T0, expires_ms=T0 + 1000)
    assert keys.check_key(key, GET, b"/", V4, T0 - 1) == core.KEY_NOT_YET_VALID
    assert keys.check_key(key, GET, b"/", V4, T0) == 2
    assert keys.check_key(key, GET, b"/", V4, T0 + 999) == 2
    assert keys.check_key(key, GET, b"/", V4, T0 + 1000) == core.KEY_EXPIRED
    assert keys.set_disabled(2, True)
    assert keys.check_key(key, GET, b"/", V4, T0) == core.KEY_DISABLED
    assert keys.set_disabled(2, False)
    assert keys.check_key(key, GET, b"/", V4, T0) == 2
    assert keys.revoke(2)
    assert keys.check_key(key, GET, b"/", V4, T0) == core.KEY_REVOKED
    assert keys.info(2)["flags"] == P.FLAG_REVOKED
    assert keys.revoke(3) is False and keys.set_disabled(3, True) is False


def test_put_with_flags(core, keys, new_key):
    key = new_key(1, flags=P.FLAG_DISABLED)
    assert keys.check_key(key, GET, b"/", V4, T0) == core.KEY_DISABLED
    with pytest.raises(P.CoreError, match="flags may only combine"):
        keys.put(1, keys.digest(key), flags=1)


SCOPE_CASES = [
    ("GET /orders/*", GET, b"/orders", True),
    ("GET /orders/*", GET, b"/orders/", True),
    ("GET /orders/*", GET, b"/orders/1/items", True),
    ("GET /orders/*", GET, b"/ordersX", False),
    ("GET /orders/*", POST, b"/orders/1", False),
    ("GET /orders", GET, b"/orders", True),
    ("GET /orders", GET, b"/orders/", False),
    ("GET /orders*", GET, b"/ordersX", True),
    ("GET /orders*", GET, b"/order", False),
    ("* /public/*", POST, b"/public/a", True),
    ("* /public/*", method_bit(b"BREW"), b"/public/a", True),
    ("GET,POST /x", POST, b"/x", True),
    ("GET,POST /x", method_bit(b"PUT"), b"/x", False),
    ("get /*", GET, b"/anything", True),
    ("GET *", GET, b"/anything", True),
    ("GET /", GET, b"/", True),
    ("GET /", GET, b"/a", False),
]


@pytest.mark.parametrize("scope,mbit,path,ok", SCOPE_CASES)
def test_scopes(core, keys, new_key, scope, mbit, path, ok):
    key = new_key(1, scopes=["GET /never", scope])
    assert keys.check_key(key, mbit, path, V4, T0) == (1 if ok else core.SCOPE_DENIED)


def test_no_scopes_means_all(keys, new_key):
    key = new_key(1, scopes=[])
    assert keys.check_key(key, method_bit(b"DELETE"), b"/any/thing", V4, T0) == 1


@pytest.mark.parametrize("scope,msg", [
    ("GET", "cannot parse scope 'GET' at k.scopes[0]: expected 'METHOD[,METHOD] /path', found 1 words"),
    ("FETCH /x", "cannot parse scope 'FETCH /x' at k.scopes[0]: unknown method 'FETCH'"),
    ("GET x", "cannot parse scope 'GET x' at k.scopes[0]: path must start with '/', found 'x'"),
    ("GET /a*/b", "cannot parse scope 'GET /a*/b' at k.scopes[0]: '*' is only allowed at the end of the path"),
])
def test_scope_errors(keys, scope, msg):
    with pytest.raises(P.CoreError) as ei:
        keys.put(0, b"d" * 32, scopes=[scope], where="k")
    assert str(ei.value).startswith(msg)


def test_per_key_cidrs(core, keys, new_key):
    key = new_key(1, allow_cidrs=["10.0.0.0/8", "2001:db8::/32"], deny_cidrs=["10.9.0.0/16"])
    ok, denied = 1, core.KEY_IP_DENIED
    assert keys.check_key(key, GET, b"/", bytes([10, 1, 1, 1]), T0) == ok
    assert keys.check_key(key, GET, b"/", bytes([10, 9, 1, 1]), T0) == denied
    assert keys.check_key(key, GET, b"/", bytes([11, 1, 1, 1]), T0) == denied
    mapped = bytes(10) + b"\xff\xff" + bytes([10, 1, 1, 1])
    assert keys.check_key(key, GET, b"/", mapped, T0) == ok
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    assert keys.check_key(key, GET, b"/", v6, T0) == ok
    assert keys.check_key(key, GET, b"/", bytes.fromhex("20010db9" + "00" * 12), T0) == denied
    assert keys.check_key(key, GET, b"/", b"", T0) == denied


def test_per_key_deny_only(core, keys, new_key):
    key = new_key(1, deny_cidrs=["192.0.2.0/24"])
    assert keys.check_key(key, GET, b"/", bytes([192, 0, 2, 7]), T0) == core.KEY_IP_DENIED
    assert keys.check_key(key, GET, b"/", bytes([192, 0, 3, 7]), T0) == 1
    # an unknown client address (unparseable forwarded address: b"") must not
    # slip past a deny list: any per-key rule denies it, as the global rules do
    assert keys.check_key(key, GET, b"/", b"", T0) == core.KEY_IP_DENIED
    assert keys.check_key(key, GET, b"/", b"\1\2\3", T0) == core.KEY_IP_DENIED
    plain = new_key(2)
    assert keys.check_key(plain, GET, b"/", b"", T0) == 2, "no per-key rule: the address does not matter"


def test_order_of_checks(core, keys, new_key):
    """Revoked beats expiry beats scope beats CIDR."""
    key = new_key(1, expires_ms=T0, scopes=["GET /a"], allow_cidrs=["10.0.0.0/8"])
    assert keys.check_key(key, POST, b"/b", bytes([11, 0, 0, 1]), T0) == core.KEY_EXPIRED
    keys.revoke(1)
    assert keys.check_key(key, POST, b"/b", bytes([11, 0, 0, 1]), T0) == core.KEY_REVOKED


def test_rotation_grace(core, keys, new_key):
    old = new_key(4)
    new = P.make_key("k4").encode()
    keys.rotate(4, keys.digest(new), T0 + 1000)
    assert keys.check_key(new, GET, b"/", V4, T0) == 4
    assert keys.check_key(old, GET, b"/", V4, T0 + 999) == 4
    assert keys.check_key(old, GET, b"/", V4, T0 + 1000) == core.NO_SUCH_KEY
    assert keys.info(4)["has_old_digest"]
    assert keys.sweep(T0 + 999) == 0
    assert keys.sweep(T0 + 1000) == 1
    assert not keys.info(4)["has_old_digest"]
    assert keys.check_key(old, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check_key(new, GET, b"/", V4, T0) == 4


def test_rotation_twice_and_without_grace(core, keys, new_key):
    k1 = new_key(4)
    k2, k3, k4 = (P.make_key("k4").encode() for _ in range(3))
    keys.rotate(4, keys.digest(k2), T0 + 10_000)
    keys.rotate(4, keys.digest(k3), T0 + 10_000)  # k1 drops out, k2 in grace
    assert keys.check_key(k1, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check_key(k2, GET, b"/", V4, T0) == 4
    assert keys.check_key(k3, GET, b"/", V4, T0) == 4
    keys.rotate(4, keys.digest(k4), 0)
    for k in (k1, k2, k3):
        assert keys.check_key(k, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check_key(k4, GET, b"/", V4, T0) == 4
    assert keys.stats()["digests"] == 1


def test_rotate_errors(keys, new_key):
    k = new_key(1)
    with pytest.raises(P.CoreError, match="key index 2 is not in use"):
        keys.rotate(2, b"n" * 32, 0)
    with pytest.raises(P.CoreError, match="digest already belongs to key index 1"):
        keys.rotate(1, keys.digest(k), 0)


def test_put_replaces_record_and_digest(core, keys, new_key):
    a = new_key(1, plan_id=1)
    b = P.make_key("k1").encode()
    keys.put(1, keys.digest(b), plan_id=2)
    assert keys.check_key(a, GET, b"/", V4, T0) == core.NO_SUCH_KEY
    assert keys.check_key(b, GET, b"/", V4, T0) == 1 and keys.last_plan == 2
    assert keys.info(1)["generation"] == 2
    with pytest.raises(P.CoreError, match="digest already belongs to key index 1"):
        keys.put(2, keys.digest(b))


def test_delete_keeps_probe_chains(core, arena):
    """Many keys in few slots: deleting some must not hide the rest (tombstones)."""
    t = core.KeyTable(arena, secret=SECRET)
    ks = [P.make_key(f"k{i}").encode() for i in range(64)]
    for i, k in enumerate(ks):
        t.put(i, t.digest(k))
    for i in range(0, 64, 3):
        assert t.delete(i)
    assert t.delete(0) is False
    for i, k in enumerate(ks):
        assert t.check_key(k, GET, b"/", V4, T0) == (core.NO_SUCH_KEY if i % 3 == 0 else i)
    for i in range(0, 64, 3):
        t.put(i, t.digest(ks[i]))
    assert all(t.check_key(k, GET, b"/", V4, T0) == i for i, k in enumerate(ks))
    assert len(t) == 64


def test_full_table_and_bad_index(core, arena):
    t = core.KeyTable(arena, secret=SECRET)
    for _ in range(64):
        i = t.allocate()
        t.put(i, t.digest(P.make_key(f"k{i}").encode()))
    with pytest.raises(P.CoreError, match=r"key table full: all 64 records are in use \(raise key_capacity\)"):
        t.allocate()
    with pytest.raises(P.CoreError, match=r"key index must be 0\.\.63, found 64"):
        t.put(64, b"x" * 32)
    with pytest.raises(P.CoreError, match="expected a 32-byte digest"):
        t.put(1, b"x" * 31)
    t.delete(17)
    assert t.allocate() == 17


def test_meta_info_generation(keys, new_key):
    new_key(3, plan_id=4, meta=b'{"id":"k3"}', limits=["5/second", "9/month"], scopes=["GET /a"])
    assert keys.meta(3) == b'{"id":"k3"}'
    assert keys.meta(4) == b""
    info = keys.info(3)
    assert info["plan_id"] == 4 and info["limits"] == [5, 0, 0, 0, 9] and info["n_scopes"] == 1
    g = keys.generation(3)
    keys.revoke(3)
    assert keys.generation(3) == g + 1
    assert keys.info(5) is None and keys.generation(5) == 0


def test_only_the_writer_writes(core, arena, keys, new_key):
    new_key(1)
    arena.set_writer(arena.writer_pid + 1)
    with pytest.raises(P.CoreError, match=r"only the writer process \(pid \d+\) may write the arena; this is pid \d+"):
        keys.revoke(1)
    # Any other process that is not the writer may not hand the role on ...
    pid = os.fork()
    if pid == 0:
        try:
            arena.set_writer(os.getpid())
            os._exit(1)
        except P.CoreError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    # ... but the creator (the master) may take it back when a writer died.
    arena.set_writer(os.getpid())
    keys.revoke(1)


def test_ext_area_full(core):
    a = core.Arena.create(key_capacity=4, rate_capacity=1, ext_bytes=4096)
    t = core.KeyTable(a, secret=SECRET)
    if core is P:
        pytest.skip("the twin keeps extensions in Python objects")
    with pytest.raises(P.CoreError, match="key extension area full"):
        for i in range(4):
            t.put(i, t.digest(P.make_key(f"k{i}").encode()), meta=b"m" * 1500)


def test_put_keeps_a_rotation_grace_when_asked(core, arena, keys):
    old_key = P.make_key("rot").encode()
    new_key = P.make_key("rot").encode()
    old_d, new_d = keys.digest(old_key), keys.digest(new_key)
    keys.put(3, old_d)
    keys.rotate(3, new_d, grace_until_ms=2_000)
    # An update of the record during the grace period re-states the grace.
    keys.put(3, new_d, plan_id=7, prev_digest=old_d, grace_until_ms=2_000)
    assert keys.check_key(old_key, P.method_bit(b"GET"), b"/", b"", 1_000) == 3
    assert keys.check_key(new_key, P.method_bit(b"GET"), b"/", b"", 1_000) == 3
    assert keys.check_key(old_key, P.method_bit(b"GET"), b"/", b"", 2_000) == P.NO_SUCH_KEY
    # Without prev_digest a put ends the grace at once.
    keys.put(3, new_d)
    assert keys.check_key(old_key, P.method_bit(b"GET"), b"/", b"", 1_000) == P.NO_SUCH_KEY
    assert keys.check_key(new_key, P.method_bit(b"GET"), b"/", b"", 1_000) == 3


def test_rotations_keep_the_index_clean(core):
    """Issue 10: deletes and rotations used to leave tombstones that were never
    rehashed, so a miss walked ever longer chains. Past 1/8 of the slots the
    writer rebuilds the index into the spare area and swaps it in: tombstones
    and probe lengths stay bounded, and every live digest (also one in its
    rotation grace) stays findable across the swaps."""
    a = core.Arena.create(key_capacity=1024, rate_capacity=1)  # 4096 slots
    t = core.KeyTable(a, secret=SECRET)
    slots = t.stats()["slots"]
    cur = {}
    for i in range(512):
        k = P.make_key(f"k{i}").encode()
        t.put(i, t.digest(k))
        cur[i] = k
    graced = P.make_key("g").encode()
    t.put(600, t.digest(graced))
    newer = P.make_key("g").encode()
    t.rotate(600, t.digest(newer), T0 + 10**9)  # graced stays valid throughout
    worst_tomb = 0
    for r in range(12_000):
        i = r % 512
        k = P.make_key(f"k{i}").encode()
        t.rotate(i, t.digest(k), 0)
        old, cur[i] = cur[i], k
        if r % 997 == 0:
            assert t.check_key(old, GET, b"/", V4, T0) == core.NO_SUCH_KEY
        worst_tomb = max(worst_tomb, t.stats()["tombstones"])
    assert worst_tomb <= slots // 8
    misses = [t.digest(P.make_key(f"miss{j}").encode()) for j in range(300)]
    assert max(t.probes(d) for d in misses) <= 48
    assert all(t.check_key(k, GET, b"/", V4, T0) == i for i, k in cur.items())
    assert t.check_key(graced, GET, b"/", V4, T0) == 600 and t.check_key(newer, GET, b"/", V4, T0) == 600
    st = t.stats()
    assert st["digests"] == 514 and st["live"] == 513
    if core is not P:
        assert st["rebuilds"] > 0


def test_deletes_trigger_rebuild_and_reuse(core):
    a = core.Arena.create(key_capacity=64, rate_capacity=1)  # 256 slots
    t = core.KeyTable(a, secret=SECRET)
    for rnd in range(6):
        ks = {i: P.make_key(f"r{rnd}x{i}").encode() for i in range(64)}
        for i, k in ks.items():
            t.put(i, t.digest(k))
        assert all(t.check_key(k, GET, b"/", V4, T0) == i for i, k in ks.items())
        for i in range(64):
            assert t.delete(i)
        assert all(t.check_key(k, GET, b"/", V4, T0) == core.NO_SUCH_KEY for k in ks.values())
        assert t.stats()["tombstones"] <= t.stats()["slots"] // 8
    assert len(t) == 0 and t.stats()["digests"] == 0
