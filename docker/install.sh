#!/bin/sh
# Install cupynn with its runtime extras into a Python environment, then check the install.
#
# The Dockerfile runs this, and so does CI (tests/test_packaging.py, in a fresh virtual
# environment), so the image's install steps are tested without a Docker engine.
#
# usage: docker/install.sh PYTHON TARGET [EXTRAS]
#   PYTHON  interpreter of the environment to install into (e.g. /opt/venv/bin/python)
#   TARGET  a cupynn source tree (built into a wheel first) or a cupynn wheel
#   EXTRAS  pip extras, default "cuda12,profile"
# pip's cache follows the environment (the Dockerfile sets PIP_NO_CACHE_DIR=1; CI reuses it).
# CUPYNN_COMPILE_CHECK selects the NVRTC compile check at the end (see there).
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 PYTHON TARGET [EXTRAS]" >&2
    exit 2
fi
python=$1
target=$2
extras=${3:-cuda12,profile}

wheel_dir=""
if [ -d "$target" ]; then
    # The same artifact users install: a wheel, with kernels/ inside it as cupynn/kernels/.
    wheel_dir=$(mktemp -d)
    "$python" -m pip wheel --no-deps --wheel-dir "$wheel_dir" "$target"
    set -- "$wheel_dir"/cupynn-*.whl
    target=$1
fi

"$python" -m pip install "${target}[${extras}]"
if [ -n "$wheel_dir" ]; then
    rm -rf "$wheel_dir"
fi

# Drop what run-time compilation never loads (the checks below run on what is left):
# NVRTC's alternative build (libnvrtc.alt.so.*, libnvrtc-builtins.alt.so.*: ~115 MB of the
# ~230 MB the CUDA wheels install) and the CUDA runtime's static archives (for -rdc and
# static linking, which cupynn does not use). CuPy itself stays whole.
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
if [ -d "$site/nvidia" ]; then
    find "$site/nvidia" -type f \( -name 'libnvrtc*.alt.so*' -o -name '*.a' \) -print -delete \
        | sed 's/^/removed (not needed for NVRTC compilation): /'
fi

# Check from outside any source tree, so that `import cupynn` is the installed package.
cd /
"$python" - <<'PY'
import pathlib, sys
import cupynn
from cupynn import _loader
package = pathlib.Path(cupynn.__file__).resolve().parent
kernels = pathlib.Path(_loader.KERNEL_DIR).resolve()
print(f"cupynn {cupynn.__version__} from {package}; kernels from {kernels}")
if kernels != package / "kernels" or not any(kernels.glob("*.cu")):
    sys.exit("the installed cupynn does not load its kernels from the package")
PY
"$python" -m cupynn info
# Compile the kernels with NVRTC (no GPU needed): proves NVRTC and the CUDA headers work here.
# CUPYNN_COMPILE_CHECK: full (default: every instantiation for sm_80 and sm_90, minutes),
# sample (up to 14 instantiations per .cu file, every kernel template and dtype, hot ones first, for
# sm_90 only: well under a minute; CI uses it), none. The check's result cache goes to a
# temporary directory, not into the image.
case "${CUPYNN_COMPILE_CHECK:-full}" in
    full) sample="" ;;
    sample) sample="--sample 14 --arch sm_90" ;;
    none) exit 0 ;;
    *) echo "CUPYNN_COMPILE_CHECK must be full, sample or none, not '${CUPYNN_COMPILE_CHECK}'" >&2; exit 2 ;;
esac
cache=$(mktemp -d)
# shellcheck disable=SC2086  # $sample is empty or several words
CUPYNN_EMU_CACHE=$cache "$python" -m cupynn.compile_check --quiet $sample
rm -rf "$cache"
