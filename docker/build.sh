#!/usr/bin/env bash
# Build cupynn's Docker image from the Dockerfile and keep it, with or without a running
# Docker engine.
#
#   bash docker/build.sh                      # image "cupynn" (registry base nvidia/cuda)
#   bash docker/build.sh -t cupynn:dev -o cupynn.tar -- --build-arg COMPILE_CHECK=none
#   bash docker/build.sh --debian-base        # no registry: a local Debian base, as CI builds
#
# - A running engine (`docker info` answers; DOCKER_HOST is respected): `docker build -t TAG .`
#   there. The image stays in that engine: `docker run --rm --gpus all TAG`. With -o FILE it is
#   also saved to FILE.
# - No running engine: needs root and an installed dockerd (Debian/Ubuntu: apt-get install
#   docker.io; this script installs nothing). It starts a private engine (all of its files in
#   a temporary directory, no bridge or iptables changes; docker/engine.sh), builds there,
#   saves the image to FILE (default cupynn-image.tar; `docker save`), then stops the engine
#   and deletes its directory. Load the file into any engine, here or on a GPU host:
#   `docker load -i cupynn-image.tar`.
#
# Options:
#   -t, --tag TAG          image name (default cupynn)
#   -o, --output FILE      also write the image to FILE (a .gz name is gzip-compressed)
#   --debian-base [SUITE]  build FROM a minimal Debian SUITE bootstrapped locally with
#                          mmdebstrap (default: this host's Debian release, else trixie) in
#                          place of nvidia/cuda, for a machine that cannot reach a container
#                          registry; also sets INSTALL_NSYS=0 (nsys comes from NVIDIA's CUDA
#                          repository). The host's local CA certificates and a pip.conf go into
#                          a base layer (docker/engine.sh: debian_base). The rootfs tarball is
#                          cached in $CUPYNN_CI_CACHE (default ~/.cache/cupynn-ci).
#   -- ARGS                passed to `docker build` (e.g. --build-arg COMPILE_CHECK=sample)
#
# http(s)_proxy / no_proxy are passed on as build arguments when set.
# Exit status: 0 built (and saved), 1 the build or the save failed, 2 it could not start.
set -euo pipefail
HERE=$PWD  # a relative -o FILE is relative to where the command was run
cd "$(dirname "$0")/.."
T0=$(date +%s)
say() { echo "== docker/build.sh [$(($(date +%s) - T0))s]: $*"; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
cannot() { echo "docker/build.sh: $*" >&2; exit 2; }

TAG=cupynn
OUTPUT=""
DEBIAN_BASE=""
SUITE=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        -t|--tag) [ "$#" -ge 2 ] || cannot "$1 needs a value"; TAG=$2; shift 2 ;;
        -o|--output) [ "$#" -ge 2 ] || cannot "$1 needs a value"; OUTPUT=$2; shift 2 ;;
        --debian-base)
            DEBIAN_BASE=1
            if [ "$#" -ge 2 ] && [[ "$2" != -* ]]; then SUITE=$2; shift; fi
            shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) cannot "unknown option $1 (options for docker build go after --; --help)" ;;
    esac
done
BUILD_ARGS=("$@")
case "$OUTPUT" in ""|/*) ;; *) OUTPUT="$HERE/$OUTPUT" ;; esac
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!v:-}" ] || BUILD_ARGS+=(--build-arg "$v=${!v}")
done

# shellcheck source=docker/engine.sh
. docker/engine.sh
engine_client || cannot "no docker client or engine installed (Debian/Ubuntu: apt-get install docker.io)"

WORK=""
PRIVATE=""
cleanup() {
    if [ -n "$PRIVATE" ]; then
        engine_stop "$WORK"
        say "private engine stopped (${ENGINE_STOP_S}s) and its directory deleted (${ENGINE_RM_S}s)"
    elif [ -n "$WORK" ]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cupynn-build.XXXXXX")

NETWORK=()
if engine_running; then
    say "building in the running engine ($("$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null), ${DOCKER_HOST:-the default socket})"
else
    [ -n "$OUTPUT" ] || OUTPUT=cupynn-image.tar
    case "$OUTPUT" in /*) ;; *) OUTPUT="$HERE/$OUTPUT" ;; esac
    engine_start "$WORK/engine" || cannot "no running Docker engine, and a private one cannot start: $ENGINE_ERROR"
    PRIVATE=1
    NETWORK=(--network host)  # the private engine has no bridge network
    say "no running engine: started a private dockerd $("$DOCKER" version --format '{{.Server.Version}}') (files in $WORK/engine, deleted at the end); the image will be saved to $OUTPUT"
fi

if [ -n "$DEBIAN_BASE" ]; then
    if [ -z "$SUITE" ]; then
        # shellcheck source=/dev/null
        SUITE=$( (. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") 2>/dev/null || true)
        SUITE=${SUITE:-trixie}
    fi
    say "a Debian $SUITE base with mmdebstrap (in place of nvidia/cuda)"
    debian_base "$SUITE" "${CUPYNN_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        "${CUPYNN_CI_CACHE:-$HOME/.cache/cupynn-ci}" "$WORK" "cupynn-local/base:$SUITE" || cannot "$ENGINE_ERROR"
    BUILD_ARGS=(--build-arg "CUDA_IMAGE=cupynn-local/base:$SUITE" --build-arg INSTALL_NSYS=0 "${BUILD_ARGS[@]}")
    NETWORK=(--network host)
fi

say "docker build ${NETWORK[*]} ${BUILD_ARGS[*]} -t $TAG ."
export DOCKER_BUILDKIT=1
if ! "$DOCKER" build "${NETWORK[@]}" "${BUILD_ARGS[@]}" -t "$TAG" .; then
    echo "docker/build.sh: docker build failed" >&2
    exit 1
fi
size=$("$DOCKER" image inspect --format '{{.Size}}' "$TAG")
say "built $TAG: $((size / 1000000)) MB"

if [ -n "$OUTPUT" ]; then
    say "saving $TAG to $OUTPUT"
    case "$OUTPUT" in
        *.gz) "$DOCKER" save "$TAG" | gzip -1 >"$OUTPUT.part" ;;
        *) "$DOCKER" save -o "$OUTPUT.part" "$TAG" ;;
    esac || { rm -f "$OUTPUT.part"; echo "docker/build.sh: docker save failed" >&2; exit 1; }
    mv "$OUTPUT.part" "$OUTPUT"
    say "saved $OUTPUT ($(($(stat -c %s "$OUTPUT") / 1000000)) MB): docker load -i $OUTPUT, then docker run --rm --gpus all $TAG"
fi
if [ -z "$PRIVATE" ]; then
    say "kept in the running engine: docker run --rm --gpus all $TAG"
fi
