#!/usr/bin/env python3
"""Performance model on paper of the CUDA path: llama134m, seq 1024, micro-batch 12, bf16 compute
with f32 master weights, on one H100 SXM. A model, not a measurement (no GPU was lent).

It replays what the CUDA build executes, on two paths: the `reference` ops of src/model/ops
(candle primitives: `train.kernels=reference`, or our kernels failing their self-check) and the
path a CUDA run takes now, where our kernels replace three of them (perf_model/cuda.py: the
Triton flash-attention with RoPE on load over the packed q/k/v projection, the embedding's
backward, the chunked linear + cross-entropy). Each path is the forward pass of `Llama::loss`,
then candle 0.11.1's `Tensor::backward` (backprop.rs) node by node with its rules, with our autograd
patch (vendor/candle-core: a first gradient stored as it is, none for untracked operands; the plan's
first row is candle as released: every contribution a zero-filled tensor plus an `add`, untracked
operands given a full-size gradient kept in the store), then clipping and the optimizer's tensor-op
paths (src/optim/adam.rs, src/optim/bsfa/). Each kernel gets FLOPs, bytes read + written (in
the dtype the code stores) and a time at the roofline max(FLOPs / (peak x eff), bytes /
(bandwidth x eff)); each launch costs host time. Live device memory is tracked through the
forward graph and the gradient store for the peak.

Then the fusions of docs/gpu.md still to write are applied to the path of now one by one,
largest saving first, down to the planned end state.

    python3 scripts/gpu_perf_model.py            # the tables of docs/gpu.md
    python3 scripts/gpu_perf_model.py --kernels  # also every kernel class per op group (now)
    python3 scripts/gpu_perf_model.py --json     # only the predictions, one JSON object
    python3 scripts/gpu_perf_model.py --check-inventory FILE  # against the Rust graph

`--json` prints one object and nothing else, for scripts that check the predictions:

    {"model": "llama134m", "dtype": "bf16",
     "gpu": {"name", "count", "peak_bf16_tflops", "hbm_tb_per_s",
             "memory_gib": what nvidia-smi shows, "usable_gib": 95% of it},
     "micro_batch": 12, "seq_len": 1024, "micro_batches_per_preset_step": 40,
     "model_flops_per_token": 6 N + 12 L C T, "now_kernels": [our kernels on the path of now],
     "reference" | "now" | "planned": {
         "bench_adamw" | "bench_adam_mini_bsfa_f32" | "bench_adam_mini_bsfa_4bit"
         | "preset_adamw" | "preset_adam_mini_bsfa_f32" | "preset_adam_mini_bsfa_4bit": {
             "tokens_per_step", "ms_per_step", "tokens_per_s",
             "mfu_percent": model FLOPs per token x tokens_per_step / step time / peak,
             "peak_gib": predicted peak device memory at micro-batch 12,
             "fits_80gb": peak_gib <= usable_gib}}}

"reference" is candle's ops only, "now" the code as it is, "planned" every fusion of the plan
applied. A bench step is one micro-batch and an optimizer step (`bench --batch-size 12`), a
preset step 40 micro-batches and one optimizer step (configs/llama134m.json).

Plain Python 3, no packages; the model itself is the package perf_model/ beside this script.
"""
import argparse
import json
import sys

sys.dont_write_bytecode = True  # importing perf_model/ leaves no __pycache__ in the tree

from perf_model import inventory
from perf_model.cuda import KERNELS
from perf_model.plan import Plan
from perf_model.report import (RUNS_NOW, RUNS_REFERENCE, optimizer_times, print_header,
                               print_kernels, print_memory, print_op_table, print_step_table)
from perf_model.simulate import Run

sys.setrecursionlimit(100000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="kernel classes per op group")
    ap.add_argument("--json", action="store_true",
                    help="only the predictions, as one JSON object (schema: this docstring)")
    ap.add_argument("--check-inventory", metavar="FILE",
                    help="compare the model's graph with the Rust code's (tests/perf_model.rs)")
    args = ap.parse_args()
    if args.check_inventory:
        inventory.main(args.check_inventory)

    ref = Run()
    now = Run(KERNELS)
    opt = optimizer_times(ref)
    plan = Plan(ref, now, opt)
    if args.json:
        print(json.dumps(plan.predictions(), indent=1))
        return
    print_header(ref)
    print()
    print("reference path (train.kernels=reference):")
    print_op_table(ref, RUNS_REFERENCE, True)
    print()
    print("CUDA path now (our kernels: " + ", ".join(KERNELS) + "):")
    print_op_table(now, RUNS_NOW, False)
    print_step_table([("reference", ref, opt), ("now", now, plan.opt_code)])
    print_memory(ref, now)
    plan.print_table()
    plan.print_end_state()
    if args.kernels:
        print_kernels(now.micro)


if __name__ == "__main__":
    main()
