"""No two modules of the package import each other (not even inside a function).

A pair that does is untangled by moving what both need into a third module, or by
giving the lower module what it needs as an argument.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cupynn"


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str], pkg: Path = PKG) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its code."""
    name = _module_name(path, pkg)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` / `from .pkg import mod` import modules too
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    files = [p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts]
    known = {_module_name(p, pkg) for p in files}
    return {_module_name(p, pkg): imports_of(p, known, pkg) for p in files}


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    # a package's __init__ re-exporting its modules is not a pair: the modules import
    # siblings, not the package (checked: they would appear as the package's name)
    return sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                   if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})


def test_no_two_modules_import_each_other():
    pairs = mutual_pairs(import_graph())
    assert not pairs, "modules that import each other:\n" + "\n".join(f"  {a} <-> {b}" for a, b in pairs)


@pytest.mark.parametrize("code,pair", [
    ("from .b import f\n", True),
    ("def g():\n    from . import b\n", True),
    ("import numpy\n", False),
])
def test_the_cycle_finder(tmp_path, code, pair):
    pkg = tmp_path / "cupynn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(code)
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    assert (mutual_pairs(import_graph(pkg)) == [("cupynn.a", "cupynn.b")]) == pair
