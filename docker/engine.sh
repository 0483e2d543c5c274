# shellcheck shell=bash
# A Docker engine to build with, and a Debian base image for machines without a container
# registry. Sourced by docker/build.sh (the user's build) and .ci/image (CI's build and test).
#
#   engine_client             sets DOCKER: the client of the same package as dockerd when one
#                             is installed (another docker on PATH may not match the engine),
#                             else the docker on PATH; returns 1 if there is none
#   engine_running            0 if "$DOCKER" reaches an engine (DOCKER_HOST or the default socket)
#   engine_start WORK         starts a private dockerd: config, data root, exec root, pid file and
#                             socket all under the directory WORK (created), no bridge network and
#                             no iptables changes (builds and containers that need the network use
#                             the host's), niced; exports DOCKER_HOST. Needs root. On failure
#                             returns 1 with the reason in ENGINE_ERROR.
#   engine_stop WORK          removes the private engine's containers, stops it (and its
#                             containerd), unmounts what it left under WORK and deletes WORK with
#                             every image in it; sets ENGINE_STOP_S and ENGINE_RM_S (seconds)
#   debian_base SUITE MIRROR CACHE WORK TAG
#                             builds image TAG: a minimal Debian SUITE from MIRROR (mmdebstrap;
#                             the root file system tarball cached in CACHE, rebuilt after 7
#                             days) with the host's local CA certificates
#                             (/usr/local/share/ca-certificates, for a TLS-inspecting proxy), a
#                             pip.conf that points pip at the system's CA bundle (and at
#                             PIP_INDEX_URL / PIP_EXTRA_INDEX_URL when set) and apt's docker-clean
#                             settings, in a layer of its own; none of it goes into a repository
#                             file. Returns 1 with ENGINE_ERROR on failure.
#
# What they change on the host: nothing outside WORK and CACHE, besides the running
# processes (dockerd and its containerd, while the engine runs). Installing docker.io or
# mmdebstrap is the caller's business (.ci/image does, with apt-get; docker/build.sh asks).

ENGINE_PID=""
ENGINE_ERROR=""

_engine_alive() {  # PID: not exited (kill -0 also succeeds on an exited child not yet waited for)
    local state
    state=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}

engine_client() {
    DOCKER=""
    if command -v dockerd >/dev/null 2>&1; then
        DOCKER=$(dirname "$(command -v dockerd)")/../bin/docker
        [ -x "$DOCKER" ] || DOCKER=""
    fi
    [ -n "$DOCKER" ] || DOCKER=$(command -v docker || true)
    [ -n "$DOCKER" ]
}

engine_running() {
    [ -n "${DOCKER:-}" ] && "$DOCKER" info >/dev/null 2>&1
}

engine_start() {
    local work=$1
    ENGINE_ERROR=""
    if [ "$(id -u)" != 0 ]; then
        ENGINE_ERROR="starting a Docker engine needs root"
        return 1
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        ENGINE_ERROR="no dockerd installed (Debian/Ubuntu: apt-get install docker.io)"
        return 1
    fi
    mkdir -p "$work"
    echo '{}' >"$work/daemon.json"  # not the host's /etc/docker/daemon.json
    export DOCKER_HOST="unix://$work/docker.sock"
    export DOCKER_BUILDKIT=1
    nice -n 10 dockerd --config-file "$work/daemon.json" --data-root "$work/data" \
        --exec-root "$work/exec" --pidfile "$work/dockerd.pid" --host "$DOCKER_HOST" \
        --bridge none --iptables=false --ip6tables=false >"$work/dockerd.log" 2>&1 &
    ENGINE_PID=$!
    for _ in $(seq 60); do
        "$DOCKER" version >/dev/null 2>&1 && return 0
        _engine_alive "$ENGINE_PID" || break
        sleep 0.5
    done
    "$DOCKER" version >/dev/null 2>&1 && return 0
    local reason
    reason=$(grep -E 'level=(error|fatal)' "$work/dockerd.log" | tail -n 1 | sed 's/.*msg="\([^"]*\)".*/\1/')
    ENGINE_ERROR="dockerd did not start: ${reason:-see $work/dockerd.log}"
    return 1
}

engine_stop() {
    local work=$1 t0 t1 containerd
    t0=$(date +%s)
    if [ -n "$ENGINE_PID" ] && kill -0 "$ENGINE_PID" 2>/dev/null; then
        "$DOCKER" ps -aq 2>/dev/null | xargs -r "$DOCKER" rm -f >/dev/null 2>&1 || true
        kill -TERM "$ENGINE_PID" 2>/dev/null || true
        for _ in $(seq 60); do _engine_alive "$ENGINE_PID" || break; sleep 0.5; done
        kill -KILL "$ENGINE_PID" 2>/dev/null || true
        wait "$ENGINE_PID" 2>/dev/null || true
    fi
    t1=$(date +%s)
    ENGINE_STOP_S=$((t1 - t0))
    # the containerd that dockerd started, should it have outlived a killed dockerd
    containerd=$(cat "$work/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -n "$containerd" ] && _engine_alive "$containerd" &&
            grep -q "$work" "/proc/$containerd/cmdline" 2>/dev/null; then
        kill -TERM "$containerd" 2>/dev/null || true
        sleep 2
        kill -KILL "$containerd" 2>/dev/null || true
    fi
    # anything the engine left mounted under its directories, innermost first
    awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
    ENGINE_RM_S=$(($(date +%s) - t1))
}

debian_base() {
    local suite=$1 mirror=$2 cache=$3 work=$4 tag=$5 key tarball crt extra
    ENGINE_ERROR=""
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        ENGINE_ERROR="no mmdebstrap installed (Debian/Ubuntu: apt-get install mmdebstrap)"
        return 1
    fi
    mkdir -p "$cache"
    # Like Debian's slim images: no documentation, manual pages or translations (copyrights
    # stay); the dpkg excludes stay in the base, so the Dockerfile's packages are installed slim too.
    local opts=(--variant=minbase --aptopt='Acquire::Retries "3"'
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
        --dpkgopt='path-exclude=/usr/share/locale/*')
    key=$(printf '%s\n' "$suite" "$mirror" "${opts[@]}" | sha256sum | cut -c1-12)
    tarball="$cache/debian-$suite-$key.tar"
    if [ -s "$tarball" ] && [ -z "$(find "$tarball" -mtime +7)" ]; then
        BASE_FROM_CACHE=1
    else
        BASE_FROM_CACHE=0
        rm -f "$cache/debian-$suite-"*.tar
        if ! nice -n 10 mmdebstrap --quiet --format=tar "${opts[@]}" "$suite" "$tarball.part" "$mirror"; then
            ENGINE_ERROR="mmdebstrap could not build a Debian $suite base from $mirror"
            return 1
        fi
        mv "$tarball.part" "$tarball"
    fi
    BASE_TARBALL=$tarball
    "$DOCKER" import "$tarball" "$tag-rootfs" >/dev/null || { ENGINE_ERROR="docker import failed"; return 1; }

    mkdir -p "$work/base/ca"
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -f "$crt" ] && cp "$crt" "$work/base/ca/"
    done
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        case "${PIP_INDEX_URL:-}" in http://*|https://*) echo "index-url = $PIP_INDEX_URL" ;; esac
        extra=$(echo "${PIP_EXTRA_INDEX_URL:-}" | tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' || true)
        [ -z "$extra" ] || echo "extra-index-url = $extra"
    } >"$work/base/pip.conf"
    # apt as in Debian's and Ubuntu's own images (which nvidia/cuda builds on): downloaded
    # packages deleted after each install, no translations
    cat >"$work/base/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT
    printf '%s\n' "FROM $tag-rootfs" "COPY ca/ /usr/local/share/ca-certificates/" \
        "COPY pip.conf /etc/pip.conf" "COPY docker-clean /etc/apt/apt.conf.d/docker-clean" \
        >"$work/base/Dockerfile"
    if ! "$DOCKER" build -q -t "$tag" "$work/base" >/dev/null; then
        ENGINE_ERROR="could not build the base layer $tag"
        return 1
    fi
    BASE_CA_COUNT=$(find "$work/base/ca" -name '*.crt' | wc -l)
}
