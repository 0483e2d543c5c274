#!/bin/sh
# Install Nsight Systems' CLI (nsys) from NVIDIA's apt repositories, for nvidia/cuda images.
#
# Tries, in order: nsight-systems-cli from NVIDIA's devtools repository (CLI only, signed with
# the CUDA repository's key that nvidia/cuda images already trust), then the Nsight Systems
# package of the image's CUDA repository (cuda-nsight-systems-X-Y, else the newest
# nsight-systems-YYYY.N). Exits non-zero if none can be installed.
set -eu
export DEBIAN_FRONTEND=noninteractive

if command -v nsys >/dev/null 2>&1; then
    echo "nsys already installed: $(command -v nsys)"
    exit 0
fi

available() { apt-cache show "$1" >/dev/null 2>&1; }

# Add the devtools repository with the CUDA repository's options (its signed-by keyring).
cuda_list=$(grep -ls 'developer.download.nvidia.com/compute/cuda/repos' /etc/apt/sources.list.d/* 2>/dev/null | head -n 1 || true)
devtools_list=/etc/apt/sources.list.d/nvidia-devtools.list
if [ -n "$cuda_list" ]; then
    # shellcheck source=/dev/null
    . /etc/os-release
    options=$(sed -n 's/^deb \(\[[^]]*\]\).*/\1/p' "$cuda_list" | head -n 1)
    echo "deb ${options:+$options }https://developer.download.nvidia.com/devtools/repos/ubuntu$(echo "$VERSION_ID" | tr -d .)/$(dpkg --print-architecture) /" > "$devtools_list"
fi
if ! apt-get update; then
    echo "apt-get update failed with the devtools repository; trying the CUDA repository alone" >&2
    rm -f "$devtools_list"
    apt-get update
fi

package=""
if available nsight-systems-cli; then
    package=nsight-systems-cli
else
    cuda_major_minor=$(echo "${CUDA_VERSION:-}" | cut -d. -f1,2 | tr . -)
    if [ -n "$cuda_major_minor" ] && available "cuda-nsight-systems-$cuda_major_minor"; then
        package="cuda-nsight-systems-$cuda_major_minor"
    else
        package=$(apt-cache pkgnames nsight-systems-20 | sort -V | tail -n 1)
    fi
fi
if [ -z "$package" ]; then
    echo "no Nsight Systems package in the configured apt repositories" >&2
    exit 1
fi
echo "installing $package"
apt-get install -y --no-install-recommends "$package"
rm -rf /var/lib/apt/lists/*

if ! command -v nsys >/dev/null 2>&1; then
    found=$(find /opt/nvidia /usr/local/cuda* -type f -name nsys -perm -u+x 2>/dev/null | sort | tail -n 1)
    if [ -z "$found" ]; then
        echo "$package installed no nsys binary" >&2
        exit 1
    fi
    ln -s "$found" /usr/local/bin/nsys
fi
nsys --version
