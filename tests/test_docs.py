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
import os
import re
import subprocess
import sys
import textwrap
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


# -- the code blocks of the README and the pages under docs/ ----------------------------
#
# Every ```python block runs in a fresh interpreter (in a temporary directory), skipped only
# when a module it imports is missing or when the comment line right above its fence says
# why: "<!-- docs-test: skip: REASON -->" (not a program, e.g. a list of signatures),
# "<!-- docs-test: slow -->" (runs with --slow), "<!-- docs-test: gpu -->" (runs where a GPU
# is usable), "<!-- docs-test: tested by tests/NAME.py -->" (a test of its own runs it).
# Every command line of a ```bash block is checked without running it: `python -m cupynn
# bench ...` parses with the benchmark's own parser, `pip install ".[extra]"` names extras
# that pyproject.toml has, a script or file it names exists, and any other program is one
# of the tools the pages describe (docker, nsys, apt-get, ...), never an unknown one.

# docs/api.md is generated from the docstrings, whose examples run as doctests above
DOC_PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")
                                  if p.name != "api.md")]
_FENCE = re.compile(r"^([ \t]*)```(\w+)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(skip|slow|gpu|tested by)\b:?\s*(.*?)\s*-->")
# importable or not decides whether a block runs here; anything else must be importable
_OPTIONAL = ("torch", "jax", "dask", "distributed", "matplotlib", "scipy", "cupy", "threadpoolctl")


def doc_blocks(page: str, lang: str) -> list[tuple[int, str, tuple[str, str] | None]]:
    """(line number, code, directive) of each ``lang`` block of ``page``."""
    text = (ROOT / page).read_text()
    found = []
    for m in _FENCE.finditer(text):
        if m.group(2) != lang:
            continue
        code = textwrap.dedent(m.group(3)) if m.group(1) else m.group(3)
        before = text[:m.start()].rstrip("\n").splitlines()
        d = _DIRECTIVE.search(before[-1]) if before else None
        found.append((text.count("\n", 0, m.start()) + 1, code,
                      (d.group(1), d.group(2)) if d else None))
    return found


def _python_cases():
    cases = []
    for page in DOC_PAGES:
        for line, code, directive in doc_blocks(page, "python"):
            marks = [pytest.mark.slow] if directive and directive[0] == "slow" else []
            cases.append(pytest.param(page, line, code, directive, id=f"{page}:{line}", marks=marks))
    return cases


def _gpu_usable() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return False


@pytest.mark.parametrize("page,line,code,directive", _python_cases())
def test_docs_python_block_runs(page, line, code, directive, tmp_path):
    if directive is not None:
        kind, why = directive
        if kind == "skip":
            assert why, f"{page}:{line}: say why the block is not run"
            pytest.skip(f"{page}:{line}: not a program: {why}")
        if kind == "tested by":
            assert (ROOT / why).is_file() and page in (ROOT / why).read_text(), \
                f"{page}:{line}: {why} does not exist or does not read {page}"
            pytest.skip(f"{page}:{line}: run by {why}")
        if kind == "gpu" and not _gpu_usable():
            pytest.skip(f"{page}:{line}: needs a GPU")
    for mod in sorted(set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, flags=re.M))):
        if mod in _OPTIONAL:
            pytest.importorskip(mod)
    script = tmp_path / "block.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{page}:{line} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"


# programs that the pages describe but that the docs tests do not run (no engine, no GPU
# profiler here, or they change the machine)
_NOT_RUN = {"docker", "nsys", "ncu", "apt-get", "apt", "sudo", "mkdir", "sed", "echo", "tee",
            "curl", "wget", "gpg", "dpkg", "cat", "nvidia-smi", "hadolint", "ruff", "py-spy",
            "snakeviz", "cd", "export", "git"}


def _commands(code: str):
    """Command lines of a bash block: continuation lines joined, comments and `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
            if part:
                yield part


def check_command(cmd: str, pyproject: dict) -> str | None:
    """None if ``cmd`` is a command line the docs may show, else why not."""
    import shlex

    words = shlex.split(cmd)
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    prog, args = words[0], words[1:]
    if prog in ("python", "python3"):
        if args[:2] == ["-m", "venv"] or args[:2] == ["-m", "pytest"]:
            return None
        if args[:1] == ["-m"] and len(args) >= 2:
            module = args[1]
            if module == "cupynn":
                return _check_cupynn_cli(args[2:])
            if module == "pip":
                return check_command(" ".join(shlex.quote(a) for a in ["pip", *args[2:]]), pyproject)
            return None if importlib.util.find_spec(module) else f"no module {module}"
        if args[:1] == ["-c"]:
            return None
        script = next((a for a in args if not a.startswith("-")), None)
        return None if script and (ROOT / script).is_file() else f"no script {script}"
    if prog in (".", "source"):
        return None if args and args[0] in (".venv/bin/activate", "/etc/os-release") else f"sources {args}"
    if prog in ("bash", "sh"):
        return None if args and (ROOT / args[0]).is_file() else f"no script {args[:1]}"
    if prog == "pip":
        extras = set(pyproject["project"]["optional-dependencies"])
        for a in args:
            m = re.match(r"^(?:-e\s*)?\.\[([\w,-]+)\]$", a)
            if m:
                unknown = set(m.group(1).split(",")) - extras
                if unknown:
                    return f"pyproject.toml has no extra {sorted(unknown)}"
        return None
    if prog.startswith(("bench/", "docker/", ".ci/", "examples/", "./")):
        return None if (ROOT / prog).is_file() else f"no script {prog}"
    if prog in _NOT_RUN:
        return None
    return f"unknown program {prog!r}: check it here or add it to _NOT_RUN"


def _check_cupynn_cli(args: list[str]) -> str | None:
    import contextlib
    import io

    if not args:
        return None
    command, rest = args[0], args[1:]
    if command == "bench":
        if rest[:1] == ["dask"]:
            from cupynn.bench.dask_bench import build_parser as parser
            rest = rest[1:]
        else:
            from cupynn.bench.cli import build_parser as parser
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser().parse_args(rest)
        except SystemExit:
            return f"python -m cupynn bench rejects {rest}: {err.getvalue().strip()[-300:]}"
        return None
    from cupynn.__main__ import _COMMANDS
    return None if command in _COMMANDS else f"no command {command!r} in python -m cupynn"


def test_docs_command_lines_are_known():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bad, seen = [], 0
    for page in DOC_PAGES:
        for line, code, _ in doc_blocks(page, "bash"):
            for cmd in _commands(code):
                seen += 1
                why = check_command(cmd, pyproject)
                if why:
                    bad.append(f"{page}:{line}: {cmd}\n    {why}")
    assert seen > 20
    assert not bad, "command lines in the docs that would not work as written:\n" + "\n".join(bad)


@pytest.mark.parametrize("cmd,ok", [
    ('pip install ".[cuda12,profile]"', True),
    ('pip install ".[cuda12,nosuchextra]"', False),
    ("python -m cupynn bench seed --device cpu --quick", True),
    ("python -m cupynn bench seed --no-such-option", False),
    ("python -m cupynn nosuchcommand", False),
    ("python examples/no_such_example.py --quick", False),
    ("frobnicate --all", False),
])
def test_the_command_checker(cmd, ok):
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (check_command(cmd, pyproject) is None) == ok
