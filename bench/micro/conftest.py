"""Micro-benchmark fixtures: collect bench_*.py, and build the big tables once per session."""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(params=["cython", "python"])
def core(request):
    if request.param == "cython":
        from fastgate import _core

        return _core
    from fastgate import _core_py

    return _core_py
