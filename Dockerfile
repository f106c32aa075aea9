# syntax=docker/dockerfile:1.7
#
# bsfa-train for NVIDIA GPUs: CUDA 13.0 (driver >= 580), NCCL for multi-GPU data parallelism.
#
#   docker build -t bsfa-train:cuda .                                    # H100/H200 (sm_90)
#   docker build --build-arg CUDA_COMPUTE_CAP=80 -t bsfa-train:cuda .    # A100 (sm_80)
#   docker run --gpus all --ipc=host -e HF_HOME=/data -v "$PWD/data:/data" -v "$PWD/runs:/runs" \
#     bsfa-train:cuda --model llama134m --bsfa --nproc-per-node 4 --out /runs/llama134m-bsfa
#
# The entry point is the binary: arguments go straight to it (training is the default
# command; `prepare`, `eval`, `export`, `bench` are subcommands). `--ipc=host` gives NCCL the
# shared memory it needs across the GPUs of one host. The image runs as uid 10001; to write
# into bind-mounted host folders owned by you, add `--user "$(id -u):$(id -g)"`. `docker stop`
# sends SIGTERM: every rank checkpoints and exits (`--resume auto` continues).
#
# The build needs no GPU. scripts/check_cuda_build.sh runs the same cargo build command on a
# machine without Docker (keep the two the same; the script checks it).

ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04
# NCCL from NVIDIA's apt repository, which the CUDA images already configure: the version the
# compile check links against (PyPI nvidia-nccl-cu13 2.27.7), in both stages.
ARG NCCL_VERSION=2.27.7-1+cuda13.0

# ---- build ------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ARG NCCL_VERSION
# GPU generation the kernels are compiled for: 90 = H100/H200 (sm_90a), 80 = A100, 89 = L4/L40.
ARG CUDA_COMPUTE_CAP=90
ARG RUST_VERSION=1.95.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDA_HOME=/usr/local/cuda \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}

# A host C/C++ compiler (nvcc 13.0 takes Ubuntu 24.04's gcc 13; C dependencies build with it)
# and the NCCL headers and library to link against.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        --allow-downgrades --allow-change-held-packages \
        g++=4:13.2.0-7ubuntu1 \
        libnccl2="${NCCL_VERSION}" \
        libnccl-dev="${NCCL_VERSION}" \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

# Triton, pinned, which build.rs runs to compile our kernels (src/model/ops/triton/) to cubins.
ARG TRITON_VERSION=3.9.0
RUN python3 -m venv /opt/triton \
    && /opt/triton/bin/pip install --no-cache-dir "triton==${TRITON_VERSION}"
ENV BSFA_TRITON_PYTHON=/opt/triton/bin/python \
    BSFA_TRITON_ARCHS=80,90

# Rust through rustup, both pinned: rustup-init 1.28.2, checked against its published hash.
ADD --checksum=sha256:20a06e644b0d9bd2fbdbfd52d42540bdde820ea7df86e92e533c073da0cdd43c --chmod=755 \
    https://static.rust-lang.org/rustup/archive/1.28.2/x86_64-unknown-linux-gnu/rustup-init \
    /tmp/rustup-init
RUN /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
    && rm /tmp/rustup-init \
    && rustc --version \
    && cargo --version

WORKDIR /src
COPY . .
# The registry and target/ live in BuildKit caches, so a rebuild after a source change
# does not recompile candle's CUDA kernels (minutes of nvcc); the binary is copied out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features cuda,nccl \
    && install -D -m 755 target/release/bsfa-train /out/bsfa-train

# ---- runtime ----------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
ARG NCCL_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The runtime image has cudart, cuBLAS, cuRAND and NVRTC; NCCL is pinned to the build's.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        --allow-downgrades --allow-change-held-packages \
        libnccl2="${NCCL_VERSION}" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin bsfa \
    && mkdir -p /data /runs \
    && chown bsfa:bsfa /data /runs

COPY --from=build /out/bsfa-train /usr/local/bin/bsfa-train

# Fail the build, not the first run, if a shared library is missing (libcuda comes from the host
# driver at run time, so it is the one library allowed to be absent here).
RUN missing=$(ldd /usr/local/bin/bsfa-train | grep 'not found' | grep -v 'libcuda\.so' || true) \
    && if [ -n "${missing}" ]; then echo "missing libraries: ${missing}" >&2; exit 1; fi

USER 10001:10001
# Relative paths resolve under /: `data/...` is the /data volume and `runs/...` the /runs one.
WORKDIR /
VOLUME ["/data", "/runs"]
ENTRYPOINT ["bsfa-train"]
CMD ["--help"]
