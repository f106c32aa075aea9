#!/usr/bin/env bash
# Trains AdamW, Adam-mini and Adam-mini+BSFA on the same model, data, seed and steps, then
# plots their train and validation loss curves and prints the comparison table: final
# validation loss, the step at which each run first reaches AdamW's final validation loss
# (the paper claims ~0.5x the steps for BSFA), and the median step time.
#
#   scripts/compare_optimizers.sh OUT_DIR [training flags...]
#   scripts/compare_optimizers.sh runs/compare --data shards:data/vim --steps 1000 --eval-every 25
#
# Set BSFA_4BIT=1 to add Adam-mini+BSFA with 4-bit state, BSFA_ADAMW=1 to add AdamW+BSFA. The
# same flags go to every run, so pass everything that must be equal (model, data, seed, steps,
# lr, bsfa.*) there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,13p' "$0"
  exit 2
fi
out=$1
shift
cargo build --release --quiet
bin=target/release/bsfa-train
mkdir -p "$out"

run() {
  local name=$1
  shift
  echo "== $name" >&2
  "$bin" "$@" --out "$out/$name" > "$out/$name.summary.json"
}

run adamw "$@" --optimizer adamw
run adam-mini "$@" --optimizer adam-mini
run adam-mini-bsfa "$@" --optimizer adam-mini --bsfa
runs=("$out/adamw" "$out/adam-mini" "$out/adam-mini-bsfa")
if [ "${BSFA_4BIT:-0}" = 1 ]; then
  run adam-mini-bsfa-4bit "$@" --optimizer adam-mini --bsfa --set bsfa.bits=4
  runs+=("$out/adam-mini-bsfa-4bit")
fi
if [ "${BSFA_ADAMW:-0}" = 1 ]; then
  run adamw-bsfa "$@" --optimizer adamw --bsfa
  runs+=("$out/adamw-bsfa")
fi
"$bin" plot "${runs[@]}" --out "$out/curves.png" --title="$*" > "$out/table.json"
echo "curves: $out/curves.png, table: $out/table.json" >&2
