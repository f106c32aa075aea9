#!/usr/bin/env bash
# check_cuda_build.sh: compile-checks the CUDA + NCCL build on a machine without a GPU.
#
# 1. Installs (first run, ~15 s) or re-activates (later runs, ~2 s) the compile-only CUDA 13.0
#    toolchain from PyPI through the shared recipe shared/cuda/setup-cuda-toolchain.sh.
#    Then compiles our Triton kernels (src/model/ops/triton/) to sm_80 and sm_90 cubins with the
#    pinned Triton (aot.py; about 2 min) for the build to embed: a kernel that does not compile,
#    or a launch whose arguments are not the compiled kernel's parameters, fails here.
# 2. Runs the Dockerfile's build command, `cargo build --release --locked --features cuda,nccl`
#    (it checks that the Dockerfile still has the same command) and checks that the binary
#    links the CUDA driver library.
# 3. Links the GPU test tests/nccl.rs (without running it: no GPU here), which checks that
#    NcclCommunicator links against this NCCL (the binary links NCCL only once it uses it).
# 4. Compiles our own CUDA kernels (src/model/ops/*.cu) to PTX with nvcc, as NVRTC does on the
#    GPU at first use, so that a kernel that does not compile fails here.
# 5. Runs clippy on every target with the same features, warnings denied.
#
# Idempotent: reruns only rebuild what changed. A clean build takes ~10 min on 2 cores, most of
# it nvcc compiling candle-kernels; keep target/ between runs (and cached in CI).
#
# Environment:
#   CUDA_SETUP_SCRIPT   the recipe (default: ../shared/cuda/setup-cuda-toolchain.sh from the repo root)
#   CUDA_TOOLCHAIN_DIR  where the toolchain goes (default: ~/.cache/cuda-13.0)
#   CUDA_COMPUTE_CAP    the GPU generation to build kernels for (default 90: H100/H200; 80: A100)
#   NVCC_CCBIN          host C++ compiler for nvcc (nvcc 13.0 rejects gcc > 15; found if unset)
#   NICE                niceness of the cargo commands (default 10)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
log() { printf '[check_cuda_build] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# Keep in sync with the Dockerfile (checked below).
FEATURES=cuda,nccl
BUILD=(cargo build --release --locked --features "$FEATURES")
LINK_TEST=(cargo test --release --locked --features "$FEATURES" --test nccl --no-run --message-format=json)
CLIPPY=(cargo clippy --release --locked --all-targets --features "$FEATURES" -- -D warnings)
NICE_CMD=(nice -n "${NICE:-10}")

grep -qF -- "${BUILD[*]}" Dockerfile ||
  die "the Dockerfile no longer runs '${BUILD[*]}': keep both build commands the same"

# ---- 1. toolchain ----------------------------------------------------------------------------
SETUP=${CUDA_SETUP_SCRIPT:-$ROOT/../shared/cuda/setup-cuda-toolchain.sh}
[[ -f $SETUP ]] || die "no CUDA toolchain recipe at $SETUP (set CUDA_SETUP_SCRIPT)"
ENV_SH=$(bash "$SETUP") || die "the CUDA toolchain recipe $SETUP failed"
# shellcheck source=/dev/null
. "$ENV_SH"
log "toolchain: $(nvcc --version | tail -n 1), CUDA_HOME=$CUDA_HOME, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

if [[ -z ${NVCC_CCBIN:-} ]] && (($(gcc -dumpversion | cut -d. -f1) > 15)); then
  for cxx in g++-15 g++-14 g++-13 g++-12; do
    if command -v "$cxx" >/dev/null; then
      NVCC_CCBIN=$(command -v "$cxx")
      export NVCC_CCBIN
      log "gcc $(gcc -dumpversion) is too new for nvcc 13.0: NVCC_CCBIN=$NVCC_CCBIN"
      break
    fi
  done
fi

# ---- 1b. our Triton kernels, compiled ahead of time to cubins (sm_80 and sm_90) ------------------
# Needs Triton 3.9.0 (pinned): the test tools' Python (scripts/install_test_tools.sh, BSFA_PYTHON).
TRITON_PYTHON=${BSFA_PYTHON:-python3}
"$TRITON_PYTHON" -c 'import triton' 2>/dev/null ||
  die "no triton in $TRITON_PYTHON: eval \"\$(scripts/install_test_tools.sh)\" (or pip install triton==3.9.0)"
log "Triton AOT: src/model/ops/triton/aot.py"
t0=$SECONDS
"${NICE_CMD[@]}" "$TRITON_PYTHON" src/model/ops/triton/aot.py \
  --out "${CARGO_TARGET_DIR:-$ROOT/target}/triton" --archs 80,90 ||
  die "a Triton kernel does not compile"
log "Triton AOT took $((SECONDS - t0)) s"
# build.rs embeds these instead of compiling them again.
export BSFA_TRITON_CUBINS=${CARGO_TARGET_DIR:-$ROOT/target}/triton

# ---- 2. the Dockerfile's build ----------------------------------------------------------------
log "${BUILD[*]}"
t0=$SECONDS
"${NICE_CMD[@]}" "${BUILD[@]}"
log "build took $((SECONDS - t0)) s"

# The shared libraries an executable needs, space separated.
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' '; }

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/bsfa-train
libs=$(needed "$BIN")
log "$BIN needs: $libs"
[[ " $libs " == *" libcuda.so.1 "* ]] || die "$BIN does not link libcuda.so.1: built without CUDA?"

# ---- 3. NCCL link check --------------------------------------------------------------------------
log "${LINK_TEST[*]}"
test_bin=$("${NICE_CMD[@]}" "${LINK_TEST[@]}" |
  sed -n 's/.*"name":"nccl".*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[[ -n $test_bin && -x $test_bin ]] || die "cargo built no executable for tests/nccl.rs"
libs=$(needed "$test_bin")
log "tests/nccl.rs needs: $libs"
[[ " $libs " == *" libnccl.so.2 "* ]] || die "$test_bin does not link libnccl.so.2"

# ---- 4. our own CUDA kernels (NVRTC compiles them on the GPU at first use) -----------------------
for cu in src/model/ops/*.cu; do
  log "nvcc -ptx $cu"
  nvcc -ptx -arch="compute_${CUDA_COMPUTE_CAP}" ${NVCC_CCBIN:+-ccbin "$NVCC_CCBIN"} "$cu" -o /dev/null ||
    die "$cu does not compile"
done

# ---- 5. clippy ---------------------------------------------------------------------------------
log "${CLIPPY[*]}"
t0=$SECONDS
"${NICE_CMD[@]}" "${CLIPPY[@]}"
log "clippy took $((SECONDS - t0)) s"
log "ok"
