"""Clipping and the optimizers, on the tensor-op paths any non-CPU tensor takes
(src/optim/adam.rs, src/optim/bsfa/): their kernels per optimizer step."""
from math import ceil

from .hw import (BSFA_GROUPS, BSFA_K, BSFA_L, BSFA_T, EFF_BW, EIGEN, HOST_THREADS,
                 LLAMA134M, MIN_KERNEL, PCIE, PEAK_FP32, SYNC, prod)
from .sim import S


def param_shapes(d=LLAMA134M):
    """(name, shape, group, Adam-mini block) of each parameter, in `Llama::new`'s order."""
    C, H, HD, I, KV, V = d.C, d.H, d.HD, d.I, d.KV, d.V
    shapes = [("embed", (V, C), "embed", C)]
    for _ in range(d.L):
        shapes += [("norm", (C,), "norm", C), ("q", (C, C), "attn", C * C // H),
                   ("k", (KV * HD, C), "attn", C * C // H), ("v", (KV * HD, C), "attn", C),
                   ("o", (C, C), "attn", C), ("norm", (C,), "norm", C),
                   ("gate", (I, C), "mlp", C), ("up", (I, C), "mlp", C),
                   ("down", (C, I), "mlp", I)]
    shapes += [("norm", (C,), "norm", C), ("head", (V, C), "head", C)]
    return shapes


def grad_accumulate():
    """step.rs: acc + g per parameter, from the second micro-batch on."""
    S.phase, S.group = "opt", "gradient accumulation"
    for _, shape, _, _ in param_shapes():
        n = prod(shape)
        S.k("add", nbytes=12 * n)


def clip():
    """optim::global_norm on a device tensor: sqr, sum_all, to f64, to_scalar (a sync) each."""
    S.phase, S.group = "opt", "clip (grad norm)"
    for _, shape, _, _ in param_shapes():
        n = prod(shape)
        S.k("sqr", nbytes=8 * n)
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("reduce-sum", nbytes=4 * n + 4, eff=EFF_BW)
        S.k("cast", nbytes=12)
        S.k("sync", gpu=SYNC)


def adam(block_of):
    """Adam::update_with_tensor_ops, once per parameter, then Var::set (a copy)."""
    S.phase, S.group = "opt", "optimizer (Adam tensor ops)"
    for name, shape, _, mini_block in param_shapes():
        n = prod(shape)
        blk = block_of(name, shape, mini_block)
        nb = n // blk
        f = 4
        S.k("affine", nbytes=2 * f * n)                     # grad * scale
        S.k("affine", nbytes=2 * f * n)                     # m * beta1
        S.k("affine", nbytes=2 * f * n)                     # grad * (1 - beta1)
        S.k("add", nbytes=3 * f * n)                        # m
        S.k("sqr", nbytes=2 * f * n)                        # grad^2
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("reduce-sum", nbytes=f * (n + nb))              # mean over the block
        S.k("affine", nbytes=2 * f * nb)
        S.k("affine", nbytes=2 * f * nb)                    # v * beta2
        S.k("affine", nbytes=2 * f * nb)                    # mean_sq * (1 - beta2)
        S.k("add", nbytes=3 * f * nb)                       # v
        S.k("sqrt", nbytes=2 * f * nb)
        S.k("affine", nbytes=2 * f * nb)                    # / bias2_sqrt
        S.k("affine", nbytes=2 * f * nb)                    # + eps
        if blk > 1:
            S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("div", nbytes=f * (2 * n + nb))                 # m / denom (broadcast)
        S.k("affine", nbytes=2 * f * n)                     # theta * (1 - decay)
        S.k("affine", nbytes=2 * f * n)                     # update * lr / bias1
        S.k("sub", nbytes=3 * f * n)
        S.k("copy2d", nbytes=2 * f * n)                     # cat([m, v])
        S.k("copy2d", nbytes=2 * f * nb)
        S.k("copy", nbytes=2 * f * n)                       # Var::set


def dequantize4(rows, n):
    """Quant4Tensors::dequantize of rows x n on the device: about 15 launches; per value, the
    u8 -> f32 widening, nibble split, interleave, padding, scale and zero-point passes move
    about 46 bytes."""
    S.k("dequantize4", nbytes=46 * rows * n, calls=15)


def quantize4(rows, n):
    """Quant4Tensors::quantize of rows x n on the device: about 70 launches (FP8 rounding by
    comparison with device constants, no host copies); about 110 bytes moved per value."""
    S.k("quantize4", nbytes=110 * rows * n, calls=70)


def bsfa(bits, batched=False):
    """Bsfa::step on device tensors, per covered block (norms, attention, MLP), per step; the
    re-estimation every T steps batched over the blocks (pca::estimate_all): their Gram
    matrices read back in one sync, the eigenproblems solved on HOST_THREADS cores, the
    overlaps read back in one more sync. `batched`: the projection of every block in the
    three Triton launches of bsfa.py (the CUDA path), else per block in tensor ops (the
    reference path)."""
    S.phase, S.group = "opt", "BSFA projection"
    covered = [(nm, prod(sh)) for nm, sh, grp, _ in param_shapes() if grp in BSFA_GROUPS]
    k, m = BSFA_K, BSFA_L
    host = [0.0, 0.0]   # serial host work: per step, per re-estimation
    for _, n in covered:
        S.k("copy", nbytes=8 * n)                           # Before::of: flatten + copy
    # (the base step runs here)
    if batched:
        total = sum(n for _, n in covered)
        if bits == 4:
            for _, n in covered:
                dequantize4(k, n)                           # Stored::matrix() of U
        for _ in range(2):                                  # the tables, two copies
            S.k("h2d-data", gpu=MIN_KERNEL)
        # bsfa_coordinates: after, before and U read, v written; bsfa_coordinate_sum: the
        # parts (K floats per CHUNK values); bsfa_apply: U, v and theta read, theta written
        S.k("bsfa-coordinates", nbytes=(12 + 4 * k) * total)
        S.k("bsfa-sum", nbytes=4 * 64 * total / 4096)
        S.k("bsfa-apply", nbytes=(12 + 4 * k) * total)
    for _, n in covered:
        if not batched:
            S.k("sub", nbytes=12 * n)                       # update = after - before
            if bits == 4:
                dequantize4(k, n)                           # Stored::matrix() of U
            S.k("gemm", flops=2.0 * k * n, nbytes=4 * k * n + 8 * n, peak=PEAK_FP32)   # U v
            S.k("affine", nbytes=8 * k)                     # (alpha - gamma) U v
            S.k("gemm", flops=2.0 * k * n, nbytes=4 * k * n + 8 * n, peak=PEAK_FP32)  # U^T ..
            S.k("affine", nbytes=8 * n)                     # (gamma - 1) v
            S.k("add", nbytes=12 * n)
            S.k("add", nbytes=12 * n)                       # after + correction
            S.k("copy", nbytes=8 * n)                       # Var::set
        if bits == 4:
            quantize4(1, n)                                 # History::record, 4-bit row
        else:
            S.k("copy2d", nbytes=8 * n)                     # History::record: slice_set
    S.group = "BSFA re-estimation (per T)"
    re_kernels_start = len(S.kernels)
    for _, n in covered:
        if bits == 4:
            S.k("copy2d", nbytes=2 * (0.5 + 2 / 64) * m * n + 8 * m, calls=4 * m)  # concat
            dequantize4(m, n)                               # stacked history
            S.k("gemm", flops=2.0 * m * m * n, nbytes=8 * m * n, peak=PEAK_FP32)   # H H^T
            S.k("cast", nbytes=12 * m * m)                  # to f64
        else:
            # the ring, read in place: only the group of T rows written since the last
            # re-estimation times the whole ring (history.rs)
            S.k("gemm", flops=2.0 * BSFA_T * m * n, nbytes=4 * (BSFA_T + m) * n,
                peak=PEAK_FP32)
            S.k("cast", nbytes=12 * BSFA_T * m)
    rows = m if bits == 4 else BSFA_T
    S.k("copy2d", nbytes=16 * rows * m * len(covered))      # cat of the Gram products
    S.k("sync", gpu=SYNC)                                   # one to_vec1
    host[1] += EIGEN * ceil(len(covered) / HOST_THREADS)    # P G P, symmetric_eigen (rayon)
    for _, n in covered:
        S.k("h2d-data", gpu=8 * k * m / PCIE + MIN_KERNEL)
        S.k("cast", nbytes=12 * k * m)
        S.k("gemm", flops=2.0 * k * m * n, nbytes=4 * m * n + 4 * k * n, peak=PEAK_FP32)  # (C P) H
        if bits == 4:
            dequantize4(k, n)                               # old directions for the overlap
        S.k("gemm", flops=2.0 * k * k * n, nbytes=8 * k * n, peak=PEAK_FP32)       # overlap
        S.k("cast", nbytes=12 * k * k)
        S.k("sqr", nbytes=16 * k * k)
        S.k("reduce-sum", nbytes=8 * k * k)
        if bits == 4:
            quantize4(k, n)                                 # Stored::keep of the directions
    S.k("copy2d", nbytes=16 * len(covered))                 # cat of the overlaps
    S.k("sync", gpu=SYNC)                                   # one to_vec1
    return host, re_kernels_start
