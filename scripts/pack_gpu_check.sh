#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on a GPU machine that has no Rust, and packs it into
# .gpu/ (ignored by git; the device tool carries it: about 30 MB):
#   .gpu/bsfa-train.gz   the `cuda,nccl` binary, stripped
#   .gpu/nccl-test.gz    tests/nccl.rs built with the same features
# Needs the compile-only CUDA toolchain of scripts/check_cuda_build.sh (CUDA_SETUP_SCRIPT) and
# Triton 3.9.0 (scripts/install_test_tools.sh's Python, BSFA_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
setup=${CUDA_SETUP_SCRIPT:-../shared/cuda/setup-cuda-toolchain.sh}
# shellcheck disable=SC1090 # the toolchain's environment file
. "$(bash "$setup")"
# build.rs compiles our Triton kernels with the pinned Triton of the test tools' Python.
[[ -n ${BSFA_PYTHON:-} ]] || eval "$(scripts/install_test_tools.sh)"
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --features cuda,nccl
test_binary=$(cargo test --release --locked --features cuda,nccl --test nccl --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "nccl" and m.get("executable"):
        print(m["executable"])')
mkdir -p .gpu
strip -o .gpu/bsfa-train "$target/release/bsfa-train"
strip -o .gpu/nccl-test "$test_binary"
gzip -9f .gpu/bsfa-train .gpu/nccl-test
ls -la .gpu
