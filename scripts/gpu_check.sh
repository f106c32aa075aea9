#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py): run it first on any GPU machine a session
# is lent, and put its report in the README.
#
#   scripts/gpu_check.sh --binary .gpu/bsfa-train --nccl-test .gpu/nccl-test --out report.json
#   scripts/gpu_check.sh --dry-run            # every step on the CPU (CI runs this)
#
# The GPU machine needs no Rust: `scripts/pack_gpu_check.sh` builds the CUDA binary and the
# NCCL test here and packs them into .gpu/ (gzip; unpacked below when given as *.gz). The
# CUDA libraries candle and NCCL load at run time (cuBLAS, cuRAND, NCCL) are found in the
# `nvidia-*` Python packages of the machine's PyTorch when they are not on the library path.
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

if [[ " $* " != *" --dry-run "* ]]; then
  libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "*", "lib")):
        dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
exec python3 scripts/gpu_check.py "${args[@]}"
