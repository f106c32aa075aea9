#!/usr/bin/env python3
"""BSFA's step-time overhead over its base optimizer (Adam-mini) at a preset, f32 and 4-bit.

BSFA's work per step (the projection every step, the PCA every `bsfa.interval` steps) does not
depend on the batch, the forward and backward passes do. So the script measures the two apart,
on the same machine, in one run:

1. BSFA's own cost: `bsfa-train bench` at the preset's model with a one-sequence batch, Adam-mini
   with and without BSFA, after enough warm-up steps to fill the history (`bsfa.history` + 2), over
   --iters steps; the extra mean optimizer time per step (re-estimations included) is BSFA's cost.
2. The step it is added to: `bench` with the preset's own batch (e.g. 240 x 150 for llama72m) and
   plain Adam-mini, --big-iters steps.

overhead = BSFA's extra ms per step / the preset-batch step's ms. Prints one JSON line per
precision. Plain Python 3, no packages:

    cargo build --release
    python3 scripts/bench_bsfa_overhead.py --model llama72m
"""
import argparse
import json
import subprocess


def bench(binary, model, extra, warmup, iters):
    cmd = [binary, "bench", "--model", model, "--optimizer", "adam-mini",
           "--warmup", str(warmup), "--iters", str(iters)] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/bsfa-train")
    p.add_argument("--model", default="llama72m")
    p.add_argument("--iters", type=int, default=20, help="timed steps with a full history (2 re-estimations per 20)")
    p.add_argument("--big-iters", type=int, default=2)
    p.add_argument("--history", type=int, default=40)
    p.add_argument("--bits", default="32,4")
    p.add_argument("--base-step-ms", type=float,
                   help="use this preset-batch step time instead of measuring it (when one step takes too long)")
    args = p.parse_args()

    small = ["--batch-size", "1", "--micro-batch-size", "1"]
    warm = args.history + 2
    base = bench(args.binary, args.model, small, warm, args.iters)
    if args.base_step_ms:
        big = {"ms_per_step": args.base_step_ms, "batch_size": None, "seq_len": None, "given": True}
    else:
        big = bench(args.binary, args.model, [], 1, args.big_iters)
    for bits in args.bits.split(","):
        with_bsfa = bench(args.binary, args.model, small + ["--bsfa", "--set", f"bsfa.bits={bits}"], warm, args.iters)
        extra = with_bsfa["mean_optimizer_ms"] - base["mean_optimizer_ms"]
        print(json.dumps({
            "model": args.model,
            "bits": int(bits),
            "bsfa_extra_ms_per_step": round(extra, 1),
            "bsfa_projection_ms_median": round(with_bsfa["optimizer_ms"] - base["optimizer_ms"], 1),
            "base_step_ms_at_preset_batch": round(big["ms_per_step"], 1),
            "preset_batch": [big["batch_size"], big["seq_len"]],
            "base_step_given": big.get("given", False),
            "overhead": round(extra / big["ms_per_step"], 4),
            "peak_rss_mib_with_bsfa_small_batch": with_bsfa["peak_rss_mib"],
            "peak_rss_mib_without_small_batch": base["peak_rss_mib"],
        }))


if __name__ == "__main__":
    main()
