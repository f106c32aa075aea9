#!/usr/bin/env python3
"""Performance model on paper of the CUDA path: llama134m, seq 1024, micro-batch 12, bf16 compute
with f32 master weights, on one H100 SXM. A model, not a measurement (no GPU was lent).

It replays what the CUDA build executes: the forward pass of `Llama::loss` through the
`reference` ops of src/model/ops (candle primitives), then candle 0.11.1's `Tensor::backward`
(backprop.rs) node by node with its rules (every gradient contribution is a zero-filled tensor
plus an `add`, untracked broadcast operands still get a full-size gradient that stays in the store,
...), then clipping and the optimizer's tensor-op paths (src/optim/adam.rs, src/optim/bsfa/). Each
kernel gets FLOPs, bytes read + written (in the dtype the code stores) and a time at the roofline
max(FLOPs / (peak x eff), bytes / (bandwidth x eff)); each launch costs host time. Live device
memory is tracked through the forward graph and the gradient store for the peak.

Then the fused kernels of docs/gpu.md are applied one by one, largest saving first.

    python3 scripts/gpu_perf_model.py            # the tables of docs/gpu.md
    python3 scripts/gpu_perf_model.py --kernels  # also every kernel class per op group
    python3 scripts/gpu_perf_model.py --check-inventory FILE  # against the Rust graph

Plain Python 3, no packages; the model itself is the package perf_model/ beside this script.
"""
import argparse
import sys

from perf_model import inventory
from perf_model.plan import Plan
from perf_model.report import (optimizer_times, print_header, print_kernels, print_memory,
                               print_op_table, print_step_table)
from perf_model.simulate import Run

sys.setrecursionlimit(100000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="kernel classes per op group")
    ap.add_argument("--check-inventory", metavar="FILE",
                    help="compare the model's graph with the Rust code's (tests/perf_model.rs)")
    args = ap.parse_args()
    if args.check_inventory:
        inventory.main(args.check_inventory)

    r = Run()
    print_header(r)
    t_micro = print_op_table(r)
    opt = optimizer_times(r)
    print_step_table(r, t_micro, opt)
    print_memory(r)
    plan = Plan(r, opt)
    plan.print_table()
    plan.print_end_state()
    if args.kernels:
        print_kernels(r.micro)


if __name__ == "__main__":
    main()
