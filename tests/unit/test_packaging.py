"""pyproject: every extra that runs pytest installs the plugins its [tool.pytest.ini_options] needs.

`pip install '.[bench]'` then `python -m pytest bench/micro --benchmark-only` must work: with
`filterwarnings = error`, an ini option no installed plugin declares ("timeout") is an
INTERNALERROR before the first benchmark."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# ini option -> the distribution whose pytest plugin declares it
PLUGIN_OF_OPTION = {"timeout": "pytest-timeout"}


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_extras_that_run_pytest_carry_its_plugins():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ini = meta["tool"]["pytest"]["ini_options"]
    extras = meta["project"]["optional-dependencies"]
    needed = {PLUGIN_OF_OPTION[k] for k in ini if k in PLUGIN_OF_OPTION}
    assert needed == {"pytest-timeout"}
    for name in ("test", "bench"):
        have = _names(extras[name])
        assert "pytest" in have and needed <= have, (name, extras[name])


def test_schemathesis_is_pinned():
    tests = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pins = [r for r in tests if r.lower().startswith("schemathesis")]
    assert len(pins) == 1 and re.fullmatch(r"schemathesis==\d+\.\d+\.\d+", pins[0]), pins
    import schemathesis

    assert pins[0].split("==")[1] == schemathesis.__version__
