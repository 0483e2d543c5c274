# cupynn on an NVIDIA GPU: CUDA 12 runtime image, cupynn[cuda12,profile] in /opt/venv,
# Nsight Systems' CLI. Kernels compile at run time through NVRTC; NVRTC and the CUDA headers
# come from the cuda12 extra's wheels (the same install CI tests: docker/install.sh).
#
#   docker build -t cupynn .                          # with a running Docker engine
#   bash docker/build.sh                              # with or without one (docs/docker.md)
#   docker run --rm --gpus all cupynn                 # self-check, then the seed benchmark
#   docker run --rm --gpus all cupynn python -m cupynn info
#
# Needs an NVIDIA driver for CUDA 12.x on the host and the NVIDIA Container Toolkit.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# 1: install Nsight Systems' CLI (fail the build if it cannot be had), 0: skip it.
ARG INSTALL_NSYS=1

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    CUPY_CACHE_DIR=/cache/cupy

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

COPY docker/install-nsys.sh /tmp/install-nsys.sh
RUN if [ "${INSTALL_NSYS}" = 1 ]; then sh /tmp/install-nsys.sh; fi \
    && rm /tmp/install-nsys.sh

# Build-time checks inside install.sh: the installed package loads its own kernels,
# `python -m cupynn info` runs, and the kernels compile through NVRTC (no GPU needed).
COPY . /tmp/cupynn-src
# The NVRTC compile check of the build: full (every kernel instantiation; a release, minutes),
# sample (up to 14 instantiations per .cu file, every kernel kind, sm_90; CI), none.
ARG COMPILE_CHECK=full
RUN python3 -m venv /opt/venv \
    && CUPYNN_COMPILE_CHECK="${COMPILE_CHECK}" \
       sh /tmp/cupynn-src/docker/install.sh /opt/venv/bin/python /tmp/cupynn-src cuda12,profile \
    && rm -rf /tmp/cupynn-src /root/.cupy "${CUPY_CACHE_DIR}" \
    && mkdir -p "${CUPY_CACHE_DIR}" \
    && chmod 1777 "${CUPY_CACHE_DIR}" \
    && python -c "import cupy, cupynn, nvtx; print('import check: cupynn', cupynn.__version__, 'cupy', cupy.__version__)"

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/cupynn-entrypoint

# A non-root user (uid 10001: Ubuntu's own "ubuntu" user already has 1000).
RUN groupadd --gid 10001 cupynn \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash cupynn
USER 10001:10001
WORKDIR /home/cupynn

ENTRYPOINT ["/usr/local/bin/cupynn-entrypoint"]
CMD []
