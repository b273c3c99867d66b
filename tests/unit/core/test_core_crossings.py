"""Python -> core crossing counters (FASTGATE_DEBUG).

The twin always counts; the compiled core counts only when built with
-DFASTGATE_DEBUG, and its normal build compiles the counters to nothing. So
the compiled side is checked against a debug variant of _core.pyx built here
in a temp dir (~7 s at -O0, once per module): it must count exactly what the
twin counts for a run that touches every entry point once. That proves the
macro, the name table and every counting site, which the twin alone cannot."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from corehelp import SECRET, T0

import fastgate
from fastgate import _core_py as P

GET = P.method_bit(b"GET")
V4 = bytes([10, 1, 2, 3])


def touch_everything(core, tmp_path):
    """Call every entry point in CROSSINGS exactly once (constructors are not counted)."""
    a = core.Arena.create(key_capacity=4, rate_capacity=4)
    with pytest.raises(P.CoreError):
        core.Arena.attach(str(tmp_path / "no-such-arena"))
    assert a.size > 0 and (a.key_capacity, a.rate_capacity, a.auth_capacity, a.path) == (4, 4, 4, None)
    assert a.writer_pid == os.getpid()
    a.header()
    a.set_writer(os.getpid())
    assert a.repair_dead_writer() == -1 and a.recover() is False
    a.unlink()
    b = core.Arena.create(key_capacity=4, rate_capacity=4)
    assert b.import_keys(a.export_keys()) == 0
    k = core.KeyTable(a)
    assert k.capacity == 4
    k.set_secret(SECRET)
    key = P.make_key("t").encode()
    d = k.digest(key)
    i = k.allocate()
    k.put(i, d, plan_id=P.plan_id("free"))
    assert k.check_key(key, GET, b"/", V4, T0) == i and k.last_plan == P.plan_id("free")
    assert k.check(d, GET, b"/", V4, T0) == i
    k.rotate(i, P.key_digest(SECRET, P.make_key("u").encode()), T0 + 1)
    k.revoke(i)
    k.set_disabled(i, False)
    k.sweep(T0 + 2)
    # put, rotate, revoke, enable, sweep: five writes
    assert k.info(i)["generation"] == 5 and k.meta(i) == b"" and k.generation(i) == 5
    k.probes(d)
    assert len(k) == 1 and k.stats()["live"] == 1
    assert k.indexes_by_meta([b"m"]) == {}
    k.delete(i)
    k.put(i, d)  # a second put: counted twice, see below
    r = core.RateTable(a)
    pid = r.policy("key", ["5/second"])
    r.set_plans({"": pid})
    r.hit(pid, core.addr_subject(V4), T0)
    r.hit_key(pid, k, i, T0)
    out = core.Admission()
    assert r.admit(k, key, GET, b"/", V4, T0, out) == i
    r.stats()
    assert (r.limit, r.remaining, r.reset_ms, r.retry_after_ms) == (5, 3, 1000, 0)
    assert (out.index, out.generation, out.plan_id, out.policy, out.rate) == (i, 1, 0, pid, 3)
    assert (out.limit, out.remaining, out.reset_ms, out.retry_after_ms) == (5, 3, 1000, 0)
    c = core.CidrSet.compile(["10.0.0.0/8"], where="ip.allow")
    assert c.contains(V4) and len(c) == 1 and c.ranges == (1, 0) and c.where == "ip.allow"


EVERYTHING_ONCE = dict.fromkeys(P.CROSSINGS, 1) | {"KeyTable.put": 2, "Arena.create": 2}


def test_the_twin_counts_every_entry_point(tmp_path):
    P.reset_crossings()
    touch_everything(P, tmp_path)
    assert P.crossings() == EVERYTHING_ONCE
    P.reset_crossings()
    assert P.crossings() == {}


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_every_public_member_is_a_listed_crossing(impl):
    """Nothing public escapes the list, and both cores have the same public surface."""
    core = importlib.import_module("fastgate._core" if impl == "cython" else "fastgate._core_py")
    found = {"addr_subject"}
    for cls in (core.Arena, core.KeyTable, core.RateTable, core.Admission, core.CidrSet):
        for name in vars(cls):
            if not name.startswith("_") or name == "__len__":
                found.add(f"{cls.__name__}.{name}")
    assert found == set(P.CROSSINGS)
    assert core.CROSSINGS == P.CROSSINGS


def _keyed_request_old(keys, rates, key, now):
    idx = keys.check_key(key, GET, b"/orders/1", V4, now)
    keys.generation(idx)
    rates.hit_key(0, keys, idx, now)
    return rates.limit, rates.remaining, rates.reset_ms, rates.retry_after_ms


def test_a_keyed_request_is_one_call(core):
    """The worker's old path costs 7 crossings (8 with meta() on a cache miss); admit() 1,
    plus the fields the caller reads."""
    a = core.Arena.create(key_capacity=4, rate_capacity=4)
    keys = core.KeyTable(a, secret=SECRET)
    rates = core.RateTable(a)
    rates.set_plans({"free": rates.policy("key", ["100/second"])})
    key = P.make_key("w").encode()
    keys.put(1, keys.digest(key), plan_id=P.plan_id("free"))
    out = core.Admission()
    core.reset_crossings()
    _keyed_request_old(keys, rates, key, T0)
    old = core.crossings()
    core.reset_crossings()
    assert rates.admit(keys, key, GET, b"/orders/1", V4, T0, out) == 1
    assert out.generation == 1 and out.rate == 98
    new = core.crossings()
    if core.COUNTS_CROSSINGS:
        assert old == dict.fromkeys(["KeyTable.check_key", "KeyTable.generation", "RateTable.hit_key",
                                     "RateTable.limit", "RateTable.remaining", "RateTable.reset_ms",
                                     "RateTable.retry_after_ms"], 1)
        assert new == {"RateTable.admit": 1, "Admission.generation": 1, "Admission.rate": 1}
    else:  # the normal compiled build: the counters are compiled out
        assert old == new == {}


@pytest.fixture(scope="module")
def debug_core(tmp_path_factory):
    """_core.pyx built with -DFASTGATE_DEBUG as module fg_core_debug (in-process next to fastgate._core)."""
    src = Path(fastgate.__file__).parent
    d = tmp_path_factory.mktemp("fgdebug")
    shutil.copy(src / "_core.pyx", d / "fg_core_debug.pyx")
    (d / "build_debug.py").write_text(
        "from setuptools import Extension, setup\n"
        "from Cython.Build import cythonize\n"
        f"ext = Extension('fg_core_debug', ['fg_core_debug.pyx'], include_dirs=[{str(src / 'includes')!r}],\n"
        "                define_macros=[('FASTGATE_DEBUG', '1')], extra_compile_args=['-O0'])\n"
        "setup(script_args=['build_ext', '--inplace', '-q'],\n"
        "      ext_modules=cythonize([ext], language_level=3, quiet=True,\n"
        "                            compiler_directives={'boundscheck': False, 'wraparound': False,\n"
        "                                                 'cdivision': True}))\n"
    )
    res = subprocess.run([sys.executable, "build_debug.py"], cwd=d, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"debug build of _core.pyx failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    sys.path.insert(0, str(d))
    try:
        return importlib.import_module("fg_core_debug")
    finally:
        sys.path.remove(str(d))


def test_the_debug_build_counts_exactly_like_the_twin(debug_core, tmp_path):
    assert debug_core.COUNTS_CROSSINGS is True
    debug_core.reset_crossings()
    touch_everything(debug_core, tmp_path)
    assert debug_core.crossings() == EVERYTHING_ONCE
    debug_core.reset_crossings()
    assert debug_core.crossings() == {}
    test_a_keyed_request_is_one_call(debug_core)


def test_the_normal_build_compiles_the_counters_out(tmp_path):
    from fastgate import _core

    if _core.COUNTS_CROSSINGS:  # this tree itself was built with FASTGATE_DEBUG=1
        _core.reset_crossings()
        touch_everything(_core, tmp_path)
        assert _core.crossings() == EVERYTHING_ONCE
    else:
        touch_everything(_core, tmp_path)
        assert _core.crossings() == {}
