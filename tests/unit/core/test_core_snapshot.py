"""Arena.export_keys / import_keys (the key snapshot behind fast start) and
KeyTable.indexes_by_meta, on both cores; the byte-level refusals on the compiled one."""

import struct

import pytest
from corehelp import SECRET, T0

from fastgate import _core_py as P

GET = P.method_bit(b"GET")
POST = P.method_bit(b"POST")
V4 = bytes([10, 1, 2, 3])
V4_OUT = bytes([192, 168, 1, 1])


def _fill(core, cap=64):
    """A table that has seen every kind of write: puts with extensions, a rotation in
    grace, a revoke, a disable, deletes (tombstones, free extension blocks)."""
    a = core.Arena.create(key_capacity=cap, rate_capacity=16)
    t = core.KeyTable(a, secret=SECRET)
    keys = {}
    for i in range(20):
        key = P.make_key(f"id{i}").encode()
        kw = dict(meta=f"<id{i}>:tail".encode(), plan_id=P.plan_id("free") if i % 2 else 0)
        if i % 3 == 0:
            kw["scopes"] = ["GET /orders/*"]
        if i % 4 == 0:
            kw["allow_cidrs"] = ["10.0.0.0/8"]
        if i % 5 == 0:
            kw["limits"] = ["5/second"]
        if i == 7:
            kw["expires_ms"] = T0 - 1
        k = t.allocate()
        t.put(k, t.digest(key), **kw)
        keys[i] = (k, key)
    old = keys[1][1]
    new = P.make_key("id1").encode()
    t.rotate(keys[1][0], t.digest(new), T0 + 60_000)
    keys["old1"] = (keys[1][0], old)
    keys[1] = (keys[1][0], new)
    t.revoke(keys[2][0])
    t.set_disabled(keys[3][0], True)
    for i in (4, 5, 6):
        t.delete(keys.pop(i)[0])
    return a, t, keys


def _answers(t, keys):
    return {name: (t.check_key(key, GET, b"/orders/1", V4, T0), t.check_key(key, POST, b"/x", V4_OUT, T0))
            for name, (_, key) in keys.items()}


def test_round_trip_answers_the_same(core):
    a, t, keys = _fill(core)
    before = _answers(t, keys)
    infos = {n: (t.info(k), t.meta(k)) for n, (k, _) in keys.items()}
    payload = a.export_keys()
    b = core.Arena.create(key_capacity=64, rate_capacity=16)
    assert b.import_keys(payload) == len(t) == 17
    u = core.KeyTable(b, secret=SECRET)
    assert _answers(u, keys) == before
    assert {n: (u.info(k), u.meta(k)) for n, (k, _) in keys.items()} == infos
    assert before["old1"][0] == keys[1][0]  # the rotated-out key is still in its grace
    assert before[2][0] == P.KEY_REVOKED and before[3][0] == P.KEY_DISABLED and before[7][0] == P.KEY_EXPIRED
    gone = P.make_key("id4").encode()
    assert u.check_key(gone, GET, b"/orders/1", V4, T0) == P.NO_SUCH_KEY
    # the imported table takes writes: new keys do not land on live ones, deletes work
    taken = {k for k, _ in keys.values()}
    for i in range(30):
        k = u.allocate()
        assert k not in taken
        key = P.make_key(f"new{i}").encode()
        u.put(k, u.digest(key), scopes=["GET /a"], meta=b"x" * 40)
        taken.add(k)
        assert u.check_key(key, GET, b"/a", V4, T0) == k
    u.delete(keys[0][0])
    assert u.check_key(keys[0][1], GET, b"/orders/1", V4, T0) == P.NO_SUCH_KEY
    assert u.check_key(keys[8][1], GET, b"/orders/1", V4, T0) == keys[8][0]


def test_import_needs_a_fresh_arena_of_the_same_key_capacity(core):
    a, t, _ = _fill(core)
    payload = a.export_keys()
    with pytest.raises(P.CoreError, match="key_capacity"):
        core.Arena.create(key_capacity=128, rate_capacity=16).import_keys(payload)
    used = core.Arena.create(key_capacity=64, rate_capacity=16)
    u = core.KeyTable(used, secret=SECRET)
    u.put(0, u.digest(P.make_key("z").encode()))
    with pytest.raises(P.CoreError, match="held no key"):
        used.import_keys(payload)
    with pytest.raises(P.CoreError, match="magic|truncated"):
        core.Arena.create(key_capacity=64, rate_capacity=16).import_keys(b"x" * 600)


def test_export_and_import_are_writer_only(core):
    a, t, _ = _fill(core)
    payload = a.export_keys()
    a.set_writer(1)
    with pytest.raises(P.CoreError, match="writer"):
        a.export_keys()
    b = core.Arena.create(key_capacity=64, rate_capacity=16)
    b.set_writer(1)
    with pytest.raises(P.CoreError, match="writer"):
        b.import_keys(payload)


def test_indexes_by_meta(core):
    a, t, keys = _fill(core)
    got = t.indexes_by_meta([b"<id8>", b"<id1>", b"<id4>", b"<id1>", b"<id12>:tail", b"<id13>:tail-and-more"])
    assert got == {b"<id8>": keys[8][0], b"<id1>": keys[1][0], b"<id12>:tail": keys[12][0]}
    assert t.indexes_by_meta([]) == {}
    with pytest.raises(P.CoreError):
        t.indexes_by_meta([b""])


@pytest.fixture
def C():
    from fastgate import _core

    return _core


def _word(payload, i, value):
    b = bytearray(payload)
    struct.pack_into("=Q", b, 8 * i, value)
    return bytes(b)


@pytest.mark.parametrize("word, value, msg", [
    (0, 0, "magic"),
    (1, P.LAYOUT_VERSION + 1, "layout v"),
    (2, 32, "key_capacity"),
    (5, 10_000, "bytes; its header says"),
    (6, 1 << 40, "extension bytes"),
    (7, 3, "live records"),
    (10, 8, "free list"),
])
def test_compiled_import_refuses_inconsistent_payloads(C, word, value, msg):
    a, t, keys = _fill(C)
    payload = a.export_keys()
    b = C.Arena.create(key_capacity=64, rate_capacity=16)
    with pytest.raises(P.CoreError, match=msg):
        b.import_keys(_word(payload, word, value))
    # nothing was written: the arena still takes a good payload
    assert b.import_keys(payload) == 17


def test_compiled_import_refuses_truncated_and_out_of_heap_records(C):
    a, t, keys = _fill(C)
    payload = a.export_keys()
    b = C.Arena.create(key_capacity=64, rate_capacity=16)
    for cut in (0, 100, 511, len(payload) - 1):
        with pytest.raises(P.CoreError):
            b.import_keys(payload[:cut])
    bad = bytearray(payload)
    k = keys[0][0]
    struct.pack_into("=Q", bad, 512 + 128 * k + 16, len(payload) * 2)  # record k's ext_off
    with pytest.raises(P.CoreError, match="outside the copied extension heap"):
        b.import_keys(bytes(bad))
    odd = bytearray(payload)
    struct.pack_into("=I", odd, 512 + 128 * k, 3)  # seq odd: copied mid-write
    with pytest.raises(P.CoreError, match="mid-write"):
        b.import_keys(bytes(odd))
    assert len(C.KeyTable(b)) == 0
    # a read-only mmap-like buffer is accepted as well
    assert b.import_keys(memoryview(payload)) == 17


def test_compiled_export_skips_never_used_records(C):
    a = C.Arena.create(key_capacity=1000, rate_capacity=16)
    t = C.KeyTable(a, secret=SECRET)
    ka = P.make_key("a").encode()
    t.put(3, t.digest(ka))
    t.put(9, t.digest(P.make_key("b").encode()))
    t.delete(9)  # used once: its generation must survive
    p = a.export_keys()
    assert len(p) == 512 + 128 * 10 + t.stats()["ext_used"]  # records 0..9, not 10..999
    b = C.Arena.create(key_capacity=1000, rate_capacity=16)
    assert b.import_keys(p) == 1
    u = C.KeyTable(b, secret=SECRET)
    assert u.generation(3) == t.generation(3) == 1 and u.generation(9) == 0
    assert u.check_key(ka, GET, b"/", V4, T0) == 3
