"""The repository's docs stand on their own and match the code.

- docs/api.md is what ``python docs/gen_api.py`` writes from the docstrings (rerun it after
  changing a public docstring or adding a public module);
- every public function and class has a docstring with an example, and every example in a
  public module's docstrings runs (doctest);
- no tracked file points at a repository file that does not exist (a path such as
  ``kernels/README.md``, an upper-case ``NAME.md``, a Markdown link), and none says
  "issue" followed by a number (a tracker that is not part of the repository).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_is_up_to_date(gen_api, capsys):
    rc = gen_api.main(["--check"])
    out = capsys.readouterr().out
    assert rc == 0, out


def test_a_module_whose_extra_is_missing_keeps_its_section(gen_api, monkeypatch, capsys):
    """Without JAX (say) installed, --check compares every other module and keeps the
    committed cupynn.jax section; writing the file then refuses instead of dropping it."""
    importable = gen_api.importable
    missing = gen_api.public_modules()[-1]
    monkeypatch.setattr(gen_api, "importable", lambda m: ImportError(f"no {m} here")
                        if m == missing else importable(m))
    assert gen_api.main(["--check"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "not checked" in ln)
    assert "their imports fail here:" in line and missing in line
    with pytest.raises(SystemExit, match="cannot be imported here"):
        gen_api.generate()


def test_every_public_name_has_an_example(gen_api):
    missing = gen_api.missing_examples()
    assert not missing, (f"public names without a docstring example (>>>): {missing}; add one, "
                         "then run python docs/gen_api.py")


_RUN_DOCTESTS = """
import doctest, importlib, sys, warnings
failed = 0
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency is not installed
        print(f"skipped {name}: {exc}")
        continue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failed += result.failed
sys.exit(1 if failed else 0)
"""


def test_every_public_docstring_example_runs(gen_api):
    """In a fresh interpreter, so that no other test's global settings (JAX's x64 mode,
    warning filters, BLAS limits) change what an example prints."""
    proc = subprocess.run([sys.executable, "-c", _RUN_DOCTESTS, *gen_api.public_modules()],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]


# -- references -------------------------------------------------------------------------

_EXT = r"(?:md|py|cu|cuh|h|hpp|cpp|toml|sh|txt|json|png|ya?ml|cfg|ini)"
# a relative path with at least one directory: kernels/README.md, ../kernels/README.md
_PATH = re.compile(r"(?<![\w/.$~:{}<-])((?:\.\.?/)*(?:[\w.-]+/)+[\w.-]+\." + _EXT + r")\b")
# an upper-case Markdown file name on its own: README.md, RESULTS.md
_BARE = re.compile(r"(?<![\w/.$~:-])([A-Z][A-Z0-9_-]*\.md)\b")
_LINK = re.compile(r"\]\(([^)\s]+)\)")  # Markdown links, in .md files
# a section of an upper-case document: "PLAN §4", "NOTES.md §2"
_SECTION = re.compile(r"\b([A-Z][A-Z0-9_-]+)(?:\.md)?\s*§")
_ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def _repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def references(path: Path, text: str):
    """(line number, referenced path) pairs in ``text``."""
    for ln, line in enumerate(text.splitlines(), 1):
        found = {m.group(1) for m in _PATH.finditer(line)}
        found |= {m.group(1) for m in _BARE.finditer(line)}
        found |= {m.group(1) + ".md" for m in _SECTION.finditer(line)}
        if path.suffix == ".md":
            for m in _LINK.finditer(line):
                target = m.group(1).split("#")[0]
                if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    found.add(target)
        for ref in sorted(found):
            yield ln, ref


def test_no_reference_to_a_missing_file_and_no_issue_numbers():
    missing, issues = [], []
    for path in _repo_files():
        if path.suffix in (".png", ".npz"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        if path == Path(__file__).resolve():  # its examples are meant to be missing
            continue
        for ln, ref in references(path, text):
            if not any((base / ref).exists() for base in (ROOT, path.parent)):
                missing.append(f"{rel}:{ln}: {ref}")
        for ln, line in enumerate(text.splitlines(), 1):
            if _ISSUE.search(line):
                issues.append(f"{rel}:{ln}: {line.strip()[:100]}")
    assert not missing, "references to files that are not in the repository:\n" + "\n".join(missing)
    assert not issues, ("'issue N' points at a tracker outside the repository; say what is "
                        "meant instead:\n" + "\n".join(issues))


@pytest.mark.parametrize("text,found", [
    ("see PLAN.md section 3", ["PLAN.md"]),
    ("recomputed instead (PLAN §4)", ["PLAN.md"]),
    ("the dialect of notes/ABSENT.md", ["notes/ABSENT.md"]),
    ("[api](docs/missing.md#x) and [site](https://example.org/a.md)", ["docs/missing.md"]),
    ("$OUT/bench.json, /tmp/k.json, ~/x/y.txt, x.astype(cp.float64)", []),
])
def test_the_reference_scanner(text, found):
    refs = [r for _, r in references(ROOT / "x.md", text)]
    assert sorted(refs) == sorted(found)
    assert all(not (ROOT / r).exists() for r in refs)


def test_no_merge_conflict_markers():
    """A merge whose conflict markers were committed (it happened once, in README.md)."""
    marker = re.compile(r"^(<{7} |>{7} |={7}$)")
    found = []
    for path in _repo_files():
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(lines, 1)
                  if marker.match(line)]
    assert not found, "unresolved merge conflict markers:\n" + "\n".join(found)
