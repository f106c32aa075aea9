#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py, whose docstring lists the steps): run it first
# on any GPU machine a session is lent, and record its report.
#
#   scripts/gpu_check.sh --binary .gpu/bsfa-train.gz --nccl-test .gpu/nccl-test.gz \
#     --out "$OUT/gpu_check.json"      # on the GPU; add --quick when time is short
#   scripts/gpu_check.sh --rehearse    # the same command lines on the CPU, shrunk (CI runs it)
#   scripts/gpu_check.sh --dry-run     # the rehearsal with the tiny model (CI runs it)
#
# The GPU machine needs no Rust: `scripts/pack_gpu_check.sh` builds the CUDA binary and the
# NCCL test here and packs them into .gpu/ (gzip; unpacked below when given as *.gz). The CUDA
# libraries the binary loads are looked for in the `nvidia-*` Python packages and under
# /usr/local/cuda*, besides the loader's own path and cache (the `libraries` step lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
for arg in "$@"; do
  if [[ $arg == *.gz && -f $arg ]]; then
    unpacked=${arg%.gz}
    gzip -dc "$arg" >"$unpacked" && chmod +x "$unpacked"
    arg=$unpacked
  fi
  args+=("$arg")
done
# Unbuffered: progress shows as it happens, even through a pipe.
exec python3 -u scripts/gpu_check.py "${args[@]}"
