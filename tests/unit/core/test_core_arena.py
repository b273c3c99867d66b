"""The shared segment: sizes, header, attach by path, layout checks, ownership."""

import os
import struct

import pytest
from corehelp import SECRET, T0

from fastgate import _core_py as P



def test_size_for_a_million_keys(core):
    """Layout v2 adds a spare slot area and one rate entry per key: ~387 MiB of
    address space for 1M keys (was ~239), of which only touched pages cost
    memory (bench/micro reports the resident figure)."""
    a = core.Arena.create(key_capacity=1_000_000)
    assert a.size <= 400 * 2**20
    assert a.key_capacity == 1_000_000 and a.rate_capacity == 1 << 18 == a.auth_capacity
    h = a.header()
    assert h["off_krate"] - h["off_records"] == 128 * 1_000_000
    assert h["off_rate"] - h["off_krate"] == 96 * 1_000_000, "one rate entry per key index"
    assert h["off_slots2"] - h["off_slots"] == h["off_records"] - h["off_slots2"] == 8 * h["key_slots"]


def test_header_hides_the_salt_and_sizes_auth_region(core):
    a = core.Arena.create(key_capacity=10, rate_capacity=100, auth_capacity=20)
    h = a.header()
    assert not any("salt" in k for k in h)
    assert h["rate_capacity"] == 128 and h["auth_capacity"] == 32 == a.auth_capacity
    with pytest.raises(P.CoreError, match="auth_capacity must be 1..1073741824, found 0"):
        core.Arena.create(key_capacity=10, auth_capacity=0)


def test_header(core):
    a = core.Arena.create(key_capacity=10, rate_capacity=100)
    h = a.header()
    assert h["version"] == P.LAYOUT_VERSION
    assert h["key_slots"] == 64 and h["rate_capacity"] == 128 == a.rate_capacity
    assert h["writer_pid"] == os.getpid() == a.writer_pid
    assert a.path is None


@pytest.mark.parametrize("kw,msg", [
    (dict(key_capacity=0), "key_capacity must be 1..1073741824, found 0"),
    (dict(rate_capacity="x"), "rate_capacity must be 1..1073741824, found 'x'"),
    (dict(ext_bytes=10), "ext_bytes must be 4096..2**40, found 10"),
])
def test_bad_capacities(core, kw, msg):
    with pytest.raises(P.CoreError, match=msg.replace("*", r"\*").replace(".", r"\.")):
        core.Arena.create(**kw)


def test_twin_cannot_attach(tmp_path):
    with pytest.raises(P.CoreError, match="pure-Python core keeps tables in process memory"):
        P.Arena.attach(str(tmp_path / "x"))


# ---------------------------------------------------------------- Cython only: the twin does not share memory


@pytest.fixture
def C():
    from fastgate import _core

    return _core


def test_attach_by_path_shares_state(C, tmp_path):
    path = str(tmp_path / "fg-arena")
    a = C.Arena.create(key_capacity=16, rate_capacity=16, path=path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    keys = C.KeyTable(a, secret=SECRET)
    key = P.make_key("k1").encode()
    keys.put(1, keys.digest(key))
    b = C.Arena.attach(path)
    assert b.size == a.size and b.path == path
    assert C.KeyTable(b, secret=SECRET).check_key(key, 1, b"/", b"", T0) == 1
    keys.revoke(1)
    assert C.KeyTable(b, secret=SECRET).check_key(key, 1, b"/", b"", T0) == C.KEY_REVOKED
    with pytest.raises(P.CoreError, match="cannot create arena file .*File exists"):
        C.Arena.create(key_capacity=16, rate_capacity=16, path=path)
    with pytest.raises(P.CoreError, match="only the process that created the arena may unlink it"):
        b.unlink()
    a.unlink()
    assert not os.path.exists(path)
    a.unlink()  # idempotent


@pytest.mark.parametrize("offset,value,msg", [
    (8, struct.pack("=I", 99), f"has layout v99; this build expects v{P.LAYOUT_VERSION}"),
    (0, b"NOTARENA", "(not a fastgate arena)"),
    (24, struct.pack("=Q", 17), "header field key_slots is 64; expected 128 for its capacities"),
])
def test_attach_rejects_bad_headers(C, tmp_path, offset, value, msg):
    path = str(tmp_path / "fg")
    a = C.Arena.create(key_capacity=16, rate_capacity=16, path=path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)
    with pytest.raises(P.CoreError) as ei:
        C.Arena.attach(path)
    assert msg in str(ei.value) and repr(path) in str(ei.value)
    a.unlink()


def test_attach_rejects_missing_and_truncated(C, tmp_path):
    with pytest.raises(P.CoreError, match="cannot attach arena .*No such file"):
        C.Arena.attach(str(tmp_path / "nope"))
    p = tmp_path / "short"
    p.write_bytes(b"x" * 100)
    with pytest.raises(P.CoreError, match="is 100 bytes; expected at least the 4096-byte header"):
        C.Arena.attach(str(p))
    a = C.Arena.create(key_capacity=16, rate_capacity=16, path=str(tmp_path / "t"))
    os.truncate(str(tmp_path / "t"), 8192)
    with pytest.raises(P.CoreError, match="is 8192 bytes; its header says"):
        C.Arena.attach(str(tmp_path / "t"))
    a.unlink()


def _in_child(fn):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fork_inherits_anonymous_segment(C):
    a = C.Arena.create(key_capacity=16, rate_capacity=16)
    keys = C.KeyTable(a, secret=SECRET)
    rates = C.RateTable(a)
    pid_ = rates.policy("p", ["3/minute"])
    key = P.make_key("k1").encode()
    keys.put(1, keys.digest(key))

    def child():
        if keys.check_key(key, 1, b"/", b"", T0) != 1:
            return 2
        if rates.hit(pid_, 9, T0) != 2 or rates.hit(pid_, 9, T0) != 1:
            return 3
        try:
            keys.revoke(1)
        except P.CoreError:
            return 0  # the child is not the writer
        return 4

    assert _in_child(child) == 0
    assert rates.hit(pid_, 9, T0) == 0, "the parent sees the child's two hits"
    assert rates.hit(pid_, 9, T0) == C.RATE_LIMITED


def test_worker_exit_does_not_unlink(C, tmp_path):
    path = str(tmp_path / "fg")
    a = C.Arena.create(key_capacity=16, rate_capacity=16, path=path)

    def child():
        b = C.Arena.attach(path)
        return 0 if b.size == a.size else 5

    assert _in_child(child) == 0
    assert os.path.exists(path)
    a.unlink()


def test_set_writer_hands_over(C):
    a = C.Arena.create(key_capacity=16, rate_capacity=16)
    keys = C.KeyTable(a, secret=SECRET)
    r, w = os.pipe()

    def child():
        os.read(r, 1)
        keys.put(3, keys.digest(P.make_key("k3").encode()))
        return 0

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    a.set_writer(pid)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(keys) == 1
    with pytest.raises(P.CoreError, match="only the writer process"):
        keys.delete(3)
    os.close(r)
    os.close(w)
