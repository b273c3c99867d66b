"""Core fixtures: every test that takes `core` runs against the Cython core
and its pure-Python twin (ids "cython" / "python")."""

import pytest

from corehelp import SECRET

from fastgate import _core_py


@pytest.fixture(params=["cython", "python"])
def core(request):
    if request.param == "cython":
        from fastgate import _core

        return _core
    return _core_py


@pytest.fixture
def arena(core):
    return core.Arena.create(key_capacity=64, rate_capacity=64)


@pytest.fixture
def keys(core, arena):
    return core.KeyTable(arena, secret=SECRET)


@pytest.fixture
def rates(core, arena):
    return core.RateTable(arena)


@pytest.fixture
def new_key(keys):
    """new_key(index, **put_kwargs) -> the key bytes, stored under index."""

    def make(index, kid=None, **kw):
        key = _core_py.make_key(kid or f"k{index}").encode()
        keys.put(index, keys.digest(key), **kw)
        return key

    return make
