#!/usr/bin/env bash
# gpu_bench.sh: the GPU figures of the README on one CUDA machine: llama134m at the paper's
# sequence length (1024) in bf16, AdamW against Adam-mini + BSFA (f32 and 4-bit state), tokens/s,
# step time and MFU. Builds with `--features cuda,nccl` first (the compile-only toolchain of
# scripts/check_cuda_build.sh works on a GPU machine too; running needs the NVIDIA driver).
#
#   scripts/gpu_bench.sh [PEAK_TFLOPS]     # default 989: H100 SXM dense bf16 (H200: the same)
#
# Each configuration prints bench's JSON line; the summary table follows.
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK=${1:-989}
BIN=${BIN:-target/release/bsfa-train}
if [[ ! -x $BIN ]] || ! ldd "$BIN" | grep -q libcuda; then
  bash scripts/check_cuda_build.sh
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
COMMON=(bench --model llama134m --device cuda --dtype bf16 --batch-size 12 --seq-len 1024
  --warmup 3 --iters 10 --peak-tflops "$PEAK")
for run in "adamw" "adam-mini --bsfa" "adam-mini --bsfa --set bsfa.bits=4"; do
  # shellcheck disable=SC2086 # the optimizer flags are meant to split
  "$BIN" "${COMMON[@]}" --optimizer $run | tee -a /tmp/gpu_bench.jsonl
done
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/gpu_bench.jsonl")]
print("| optimizer | ms/step | tokens/s | MFU | peak RSS MiB |")
print("|---|---|---|---|---|")
for r in rows[-3:]:
    print(f"| {r['optimizer']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.3f} | {r['peak_rss_mib']:.0f} |")
PY
