"""Issue 10 item 6: the key table survives a writer killed mid-write and
hostile put() arguments.

A writer dies inside a record's seqlock write section (the test-only crash
hook _set_crash_hook(1) makes put() _exit half way through the record): until
the role is taken over the record fails closed (KEY_BUSY after a wait bounded
by time), and once the creator hands the role on, the record is the old one
again -- never the half-written one, never busy -- and can be rewritten and
reused. Both implementations run the same test (the twin shares nothing with
the child, so for it the old record is simply untouched)."""

import os

import pytest
from corehelp import T0

from fastgate import _core_py as P

GET = P.method_bit(b"GET")


def _writer_child_dies_in_put(core, arena, keys, index, digest, **kw):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(w)
            os.read(r, 1)
            if core is P:
                arena.writer_pid = os.getpid()  # the twin shares nothing: give the child's copy the role
            core._set_crash_hook(1)
            keys.put(index, digest, **kw)
            code = 2  # the hook did not fire
        finally:
            os._exit(code)
    os.close(r)
    arena.set_writer(pid)
    os.write(w, b"x")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_writer_killed_mid_put_leaves_no_key_busy_or_torn(core, arena, keys):
    old = P.make_key("k5").encode()
    keys.put(5, keys.digest(old), plan_id=1, scopes=["GET /a/*"], limits=["7/second"], meta=b"old")
    other = P.make_key("k6").encode()
    keys.put(6, keys.digest(other), plan_id=9)
    gen = keys.generation(5)
    new = P.make_key("k5").encode()
    code = _writer_child_dies_in_put(core, arena, keys, 5, keys.digest(new), plan_id=2, scopes=["GET /b/*"],
                                     limits=["1/second"], meta=b"new" * 30, expires_ms=T0 + 5)
    assert code == 70
    if core is not P:
        # before any takeover the record fails closed, after a bounded wait
        assert keys.check_key(old, GET, b"/a/x", b"", T0) == core.KEY_BUSY
    assert keys.check_key(other, GET, b"/", b"", T0) == 6, "other records are not affected"
    arena.set_writer(os.getpid())  # the master hands the role on: the record is normalised
    for _ in range(3):
        assert keys.check_key(old, GET, b"/a/x", b"", T0) == 5
        assert keys.last_plan == 1
        assert keys.check_key(old, GET, b"/b/x", b"", T0) == core.SCOPE_DENIED
        assert keys.check_key(new, GET, b"/b/x", b"", T0) == core.NO_SUCH_KEY
    info = keys.info(5)
    assert (info["plan_id"], info["limits"][0], info["expires_ms"], info["generation"]) == (1, 7, 0, gen)
    assert keys.meta(5) == b"old"
    # the normalised record can be rewritten, and its index reused for a new key
    keys.put(5, keys.digest(new), plan_id=3)
    assert keys.check_key(new, GET, b"/", b"", T0) == 5 and keys.last_plan == 3
    assert keys.check_key(old, GET, b"/", b"", T0) == core.NO_SUCH_KEY
    assert keys.delete(5)
    fresh = P.make_key("k5b").encode()
    keys.put(5, keys.digest(fresh))
    assert keys.check_key(fresh, GET, b"/", b"", T0) == 5


def test_a_new_writers_first_write_normalises_too(core, arena, keys):
    """If the master could not normalise (it handed the role on while the dead
    writer was not yet reaped), the new writer's first write does it."""
    old = P.make_key("k2").encode()
    keys.put(2, keys.digest(old), plan_id=1)
    code = _writer_child_dies_in_put(core, arena, keys, 2, keys.digest(P.make_key("k2").encode()), plan_id=2)
    assert code == 70
    arena.writer_pid  # noqa: B018 -- the dead child is still the writer here
    if core is not P:
        assert arena.recover() is True, "the creator may normalise explicitly"
        assert arena.recover() is False
    arena.set_writer(os.getpid())
    keys.revoke(7)  # any write
    assert keys.check_key(old, GET, b"/", b"", T0) == 2 and keys.last_plan == 1


@pytest.mark.parametrize("kw,msg", [
    (dict(expires_ms=2**63), "expires_ms (0 = never) must be 0..9223372036854775807, found 9223372036854775808"),
    (dict(expires_ms=-1), "expires_ms (0 = never) must be 0..9223372036854775807, found -1"),
    (dict(expires_ms="soon"), "expires_ms (0 = never) must be an integer, found str"),
    (dict(not_before_ms=2**64), "not_before_ms must be"),
    (dict(grace_until_ms=-(2**63) - 1, prev_digest=b"p" * 32), "grace_until_ms must be"),
    (dict(plan_id=2**40), "plan_id must be 0..2**31-1"),
    (dict(flags=2**40), "flags may only combine"),
])
def test_bad_put_arguments_are_refused_before_writing(core, keys, kw, msg):
    key = P.make_key("k1").encode()
    keys.put(1, keys.digest(key), plan_id=4)
    gen = keys.generation(1)
    with pytest.raises(P.CoreError) as ei:
        keys.put(1, keys.digest(P.make_key("k1").encode()), **kw)
    assert str(ei.value).startswith(msg)
    assert keys.generation(1) == gen
    assert keys.check_key(key, GET, b"/", b"", T0) == 1 and keys.last_plan == 4, "not busy, not changed"
    with pytest.raises(P.CoreError, match="grace_until_ms must be"):
        keys.rotate(1, keys.digest(P.make_key("k1").encode()), 2**63)
    assert keys.check_key(key, GET, b"/", b"", T0) == 1


def test_expiry_at_or_before_the_epoch_is_expired_not_never(core, keys):
    from fastgate.admin import keysync

    class Rec:
        expires_at = None

    rec = Rec()
    assert keysync.expires_ms(rec) == 0, "no expires_at: never"
    for stamp in ("1970-01-01T00:00:00Z", "1969-07-20T20:17:00Z", "1970-01-01T00:00:00.0005Z"):
        rec.expires_at = stamp
        assert keysync.expires_ms(rec) == 1, stamp
    rec.expires_at = "2024-01-01T00:00:00Z"
    assert keysync.expires_ms(rec) == 1_704_067_200_000
    key = P.make_key("old").encode()
    rec.expires_at = "1970-01-01T00:00:00Z"
    keys.put(1, keys.digest(key), expires_ms=keysync.expires_ms(rec))
    assert keys.check_key(key, GET, b"/", b"", T0) == core.KEY_EXPIRED
