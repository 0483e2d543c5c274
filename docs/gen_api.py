#!/usr/bin/env python3
"""Write docs/api.md, cupynn's API reference, from the docstrings.

    python docs/gen_api.py            # (re)write docs/api.md
    python docs/gen_api.py --check    # exit 1 when docs/api.md is not what the code says

Public API: the names in ``cupynn.__all__``, then every top-level module
``cupynn.<name>`` whose name does not start with ``_`` (except the tools in ``TOOLS``,
documented in their own READMEs), each with the names in its ``__all__``. An object is
documented once, under the first module that exports it; later modules point back to it.
Functions and classes appear with their signature and docstring, classes with their
public methods and properties. ``tests/test_docs.py`` runs ``--check`` and requires every
public function and class to have a docstring with an example (``>>>``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
# Command-line tools and developer packages: documented in README.md, bench/README.md and
# kernels/README.md instead.
TOOLS = {"backends", "bench", "compile_check", "emulator", "sass_stats"}


def public_modules() -> list[str]:
    import cupynn

    names = sorted(m.name for m in pkgutil.iter_modules(cupynn.__path__)
                   if not m.name.startswith("_") and m.name not in TOOLS)
    return ["cupynn"] + [f"cupynn.{n}" for n in names]


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        raise SystemExit(f"{module.__name__} is a public module but has no __all__: list its "
                         "public names there (or add it to TOOLS in docs/gen_api.py)")
    return list(names)


def importable(modname: str):
    """The module, or the ImportError that says which optional dependency it needs."""
    try:
        return importlib.import_module(modname)
    except ImportError as exc:
        return exc


def collect():
    """[(module name, module doc, entries)] with entries [(qualified name, object, first
    module or None)]; a module that cannot be imported here (an optional dependency is
    missing) comes as (module name, ImportError, None)."""
    seen: dict[int, str] = {}
    out = []
    for modname in public_modules():
        module = importable(modname)
        if isinstance(module, ImportError):
            out.append((modname, module, None))
            continue
        entries = []
        for name in public_names(module):
            obj = getattr(module, name)
            key = id(obj)
            documented = (inspect.isclass(obj) or inspect.isfunction(obj))
            if documented and key in seen:
                entries.append((f"{modname}.{name}", obj, seen[key]))
                continue
            if documented:
                seen[key] = f"{modname}.{name}"
            entries.append((f"{modname}.{name}", obj, None))
        out.append((modname, inspect.getdoc(module) or "", entries))
    return out


_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def render_doc(doc: str) -> str:
    """A docstring as Markdown: doctest blocks fenced, numpy-style headings bold."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _DOCTEST.match(line):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["```python", *block, "```"]
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and nxt.strip() and set(nxt.strip()) <= {"-", "="} and \
                len(nxt.strip()) >= len(line.strip()) * 0.8:
            out.append(f"**{line.strip()}**")
            out.append("")
            i += 2
            continue
        line = re.sub(r":(?:meth|func|class|data|attr|mod):`~?([^`]+)`", r"`\1`", line)
        out.append(line.replace("``", "`"))
        i += 1
    return "\n".join(out).strip()


def signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", sig)


def value_summary(obj) -> str:
    if inspect.ismodule(obj):
        return f"[`{obj.__name__}`](#{obj.__name__.replace('.', '')}), documented below"
    if isinstance(obj, dict):
        return f"with keys {', '.join(map(repr, obj))}"
    if isinstance(obj, (tuple, list)):
        return f"{obj!r}"
    return f"= {obj!r}"


def members(cls):
    """Public methods and properties defined by cupynn classes in ``cls``'s MRO."""
    found = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("cupynn"):
            continue
        attr = vars(owner)[name]
        if isinstance(attr, property):
            found.append((name, "property", "", inspect.getdoc(attr) or ""))
        elif isinstance(attr, (staticmethod, classmethod)):
            fn = attr.__func__
            found.append((name, type(attr).__name__, signature(getattr(cls, name)),
                          inspect.getdoc(fn) or ""))
        elif inspect.isfunction(attr):
            sig = signature(attr)
            sig = re.sub(r"^\(self(, )?", "(", sig)
            found.append((name, "method", sig, inspect.getdoc(attr) or ""))
    return found


def sections(text: str) -> dict[str, str]:
    """The ``## module`` sections of an api.md text, by module name."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            name = line[3:].strip()
            out[name] = ""
        if name is not None:
            out[name] += line
    return out


def generate(fallback: dict[str, str] | None = None) -> str:
    """docs/api.md's text. A module that cannot be imported here takes its section from
    ``fallback`` (the committed file's, for --check); without one that is an error."""
    parts = ["# cupynn API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when this file and the code disagree). Conventions "
             "and formulas: [`design.md`](design.md).", ""]
    mods = collect()
    parts.append("Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m, _, _ in mods))
    parts.append("")
    for modname, doc, entries in mods:
        if entries is None:
            if fallback is None or modname not in fallback:
                raise SystemExit(f"{modname} cannot be imported here ({doc}): install every "
                                 "extra before generating docs/api.md, e.g. pip install -e "
                                 "'.[test,torch,jax]'")
            parts.append(fallback[modname].rstrip("\n") + "\n")
            continue
        parts += [f"## {modname}", "", render_doc(doc), ""]
        for qual, obj, first in entries:
            short = qual.rsplit(".", 1)[1]
            if first is not None:
                parts += [f"### `{qual}`", "", f"The same object as [`{first}`](#"
                          f"{first.replace('.', '').lower()}).", ""]
                continue
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                parts += [f"### `{qual}`", "", f"*{kind}* `{short}{signature(obj)}`", "",
                          render_doc(inspect.getdoc(obj) or ""), ""]
                for name, mkind, sig, mdoc in members(obj):
                    parts += [f"#### `{short}.{name}`" + ("" if mkind == "property" else
                                                         f" `{sig}`"),
                              "", f"*{mkind}*" + (f". {render_doc(mdoc)}" if mdoc else ""), ""]
            elif inspect.isfunction(obj):
                parts += [f"### `{qual}`", "", f"*function* `{short}{signature(obj)}`", "",
                          render_doc(inspect.getdoc(obj) or ""), ""]
            elif short == "__version__":
                parts += [f"### `{qual}`", "", "*str*: the package version.", ""]
            else:
                parts += [f"### `{qual}`", "", f"*{type(obj).__name__}* "
                          f"{value_summary(obj)}", ""]
    return "\n".join(parts).rstrip() + "\n"


def missing_examples() -> list[str]:
    """Public functions and classes without a docstring example (``>>>``)."""
    bad = []
    for _, _, entries in collect():
        for qual, obj, first in entries or ():
            if first is None and (inspect.isclass(obj) or inspect.isfunction(obj)):
                if ">>>" not in (inspect.getdoc(obj) or ""):
                    bad.append(qual)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/api.md, write nothing")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        text = generate(fallback=sections(current))
        missing = [m for m, doc, entries in collect() if entries is None]
        if missing:
            print(f"(not checked, their imports fail here: {', '.join(missing)})")
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "docs/api.md",
                                        "from the docstrings", lineterm="", n=1)
            print("\n".join(list(diff)[:60]))
            print("docs/api.md is out of date: run python docs/gen_api.py")
            return 1
        print("docs/api.md is up to date")
        return 0
    text = generate()
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
