"""Every runtime dependency pyproject declares is imported by the package (xxhash was
declared for months with no importer): a dependency must earn its place in code."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAME = {"pyyaml": "yaml"}  # distribution -> the module it installs, where they differ


def _imported_top_levels() -> set[str]:
    out = set()
    for p in (ROOT / "fastgate").rglob("*.py*"):
        if p.suffix not in (".py", ".pyx"):
            continue
        text = p.read_text()
        if p.suffix == ".py":
            for node in ast.walk(ast.parse(text, str(p))):
                if isinstance(node, ast.Import):
                    out.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    out.add(node.module.split(".")[0])
        else:  # Cython: plain import lines are enough here
            out.update(re.findall(r"^\s*(?:c?import|from)\s+([A-Za-z_]\w*)", text, re.M))
    return out


def test_every_runtime_dependency_is_imported():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in deps]
    imported = _imported_top_levels()
    assert "msgspec" in imported and "yaml" in imported  # the walk sees real imports
    unused = [n for n in names if IMPORT_NAME.get(n, n) not in imported]
    assert unused == [], f"declared in pyproject.toml but imported nowhere in fastgate/: {unused}"
