#!/usr/bin/env python3
"""Checks the arithmetic of our Triton kernels on the CPU: the same kernel source the CUDA build
compiles to cubins (src/model/ops/triton/), run by Triton's interpreter (TRITON_INTERPRET=1) on
CPU torch tensors, against the math in float64, forward and backward, at odd shapes.

    TRITON_INTERPRET=1 python3 scripts/check_triton_kernels.py [--break KERNEL] [--cases N]

Needs torch and triton (scripts/install_test_tools.sh's venv; tests/triton_kernels.rs runs it).
Prints one JSON line per case and exits 1 when a case is beyond its tolerance.

Tolerances, as the worst absolute difference over the largest magnitude of the true value:
  f32: 1e-5 (f32 throughout, products in full f32, not TF32).
  bf16: at most the reference composition's own error plus 1e-4, the reference being what a
  bf16 run computes today (candle's ops: bf16 products, f32 softmax), whose error against the
  math is measured on the same inputs: the kernel must be no less exact than what it replaces.
  (Measured: 0.4-0.7 of the reference's error forward, 0.6-0.9 backward.)

The optimizer's kernels (adam.py: AdamW's and Adam-mini's updates of several tensors in one launch,
in place, and the gradient norm's sum of squares over several tensors in one launch) run in f32
only, as every run keeps parameters and moments in f32. Tolerances: 1e-6 for each of the new
parameter, first and second moments, the worst tensor's (f32 throughout; measured at most
2.3e-7), and 1e-12 for the sum of squares (f64 sums of exact f64 squares; measured at most
1.6e-16). BSFA's per-step projection (bsfa.py) likewise: 1e-6 for each block's new parameter and
update.

--break KERNEL perturbs one kernel's result on purpose (attention: forward, dq, dkdv; the output
head's cross-entropy: lse, grad; rms_norm, rms_norm_dx, rms_norm_dw, add_rms_norm_sum, add_rms_norm,
rms_norm_dx_add, swiglu, swiglu_grad; the
optimizer: adamw_theta, adamw_m, adamw_v, adam_mini_theta, adam_mini_m, adam_mini_v, sum_squares;
BSFA's projection: bsfa_coordinates, bsfa_update, bsfa_apply): the check must fail.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: the check runs the kernels in Triton's interpreter")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src/model/ops/triton"))
import adam  # noqa: E402
import bsfa  # noqa: E402
import causal_attention as ca  # noqa: E402
import cross_entropy as ce  # noqa: E402
import rms_norm as rn  # noqa: E402
import swiglu as sg  # noqa: E402

# (batch, seq, heads, kv_heads, dim): sequence 1, one not a multiple of the tiles, a full tile
# plus one, llama134m's 1024, grouped-query 2:1 and none, head dims 48 (llama134m's), 64 and
# 128, batch 1.
CASES = [
    (2, 1, 2, 2, 48),
    (1, 127, 4, 2, 48),
    (1, 1024, 2, 1, 48),
    (2, 65, 2, 1, 64),
    (1, 130, 2, 2, 128),
    (1, 200, 4, 4, 64),
]

# (rows, vocab) of the output head's row passes: one row; odd rows over a vocabulary that is
# not a multiple of BLOCK_V; the test model's 4,096 and llama's 50,304 (13 blocks, the last
# partial).
CROSS_ENTROPY_CASES = [
    (1, 4096),
    (37, 1000),
    (5, 50304),
]

# (rows, width) of the elementwise kernels: RMSNorm's n (llama134m's 768, one past a block,
# two blocks with a partial one, more rows than one dw program takes) and SwiGLU's inter.
ROW_CASES = [
    (1, 768),
    (130, 1025),
    (67, 2100),
]

# The optimizer's multi-tensor kernels, one launch over every tensor of a case: (n, block,
# decays) per tensor. AdamW (block 1): one element, one short of BLOCK and one past it, three
# blocks and a partial one, and 40,000 elements (three sum-of-squares parts, the last partial),
# weight decay on some only; Adam-mini: blocks of 100 (odd, under one chunk), 768 (llama134m's
# rows), 2,100 (three chunks, the last partial) and 5 (a norm weight, one block), decay on some
# only; n never a multiple of BLOCK except by chance of the block.
OPTIMIZER_CASES = [
    [(1, 1, False), (1023, 1, True), (1025, 1, True), (3001, 1, False), (40000, 1, True)],
    [(3700, 100, True), (5, 5, False), (3840, 768, True), (768, 768, False), (4200, 2100, True)],
]

# BSFA's projection: each case one step's blocks as (numel, directions): a block without
# directions, sizes under, at and past a program's CHUNK (4,096), k from 1 to the kernels' K (64),
# the paper's 50; then llama134m's 768 x 768 attention block with 50.
BSFA_CASES = [
    [(1, 0), (5000, 3), (300, 2)],
    [(4096, 64), (8193, 50), (77, 1), (10, 0)],
    [(768 * 768, 50)],
]


def mend_interpreter_bf16():
    """Makes Triton 3.9's interpreter compute bf16 as the GPU does. It multiplies bf16 operands
    of `tl.dot` as their raw 16-bit patterns (it widens only fp8), and it rounds f32 to bf16 by
    truncation, where the GPU rounds to nearest even. Here dot operands are widened to f32
    first, exactly (a tensor core's bf16 products are exact and accumulate in f32), and f32 is
    rounded to nearest even. The kernels' source is unchanged; only the interpreter is mended."""
    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def widened(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = (x.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(bits, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            nearest_even = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = np.where(np.isnan(src.data), bits | 0x400000, nearest_even) >> 16
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    for name in ("create_fp_trunc", "create_fp_ext"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))


def tables(seq, dim, dtype):
    """The rotary tables of rope.rs (rotate-half layout, theta 10,000)."""
    half = dim // 2
    freq = 1.0 / 10000.0 ** (torch.arange(dim, dtype=torch.float64).remainder(half) * 2 / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def split(qkv, heads, kv_heads, dim):
    b, t, _ = qkv.shape
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    return (q.reshape(b, t, heads, dim).transpose(1, 2), k.reshape(b, t, kv_heads, dim).transpose(1, 2),
            v.reshape(b, t, kv_heads, dim).transpose(1, 2))


def attention(qkv, cos, sin, heads, kv_heads, dim, widen=None):
    """The op as tensor algebra; `widen` (the reference composition's rule) computes the
    softmax in f32 and casts the probabilities back, as candle's bf16 graph does."""
    q, k, v = split(qkv, heads, kv_heads, dim)
    group = heads // kv_heads
    q = rope(q, cos, sin) * (1.0 / math.sqrt(dim))
    k = rope(k, cos, sin).repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    t = qkv.shape[1]
    mask = torch.full((t, t), float("-inf"), dtype=q.dtype).triu(1)
    scores = q @ k.transpose(-1, -2) + mask
    probs = scores.softmax(-1) if widen is None else scores.to(widen).softmax(-1).to(q.dtype)
    out = probs @ v
    return out.transpose(1, 2).reshape(qkv.shape[0], t, heads * dim)


def kernels(qkv, cos, sin, d_out, heads, kv_heads, dim, broken=None):
    """The Triton kernels' forward and d_qkv, run as the CUDA build launches them."""
    b, t, _ = qkv.shape
    half, full = ca.tiles(dim)
    ieee = qkv.dtype == torch.float32
    scale = 1.0 / math.sqrt(dim)
    out = torch.empty(b, t, heads * dim, dtype=qkv.dtype)
    lse = torch.empty(b, heads, t, dtype=torch.float32)
    delta = torch.empty_like(lse)
    d_qkv = torch.full_like(qkv, float("nan"))
    tiles = dict(HALF=half, FULL=full, IEEE=ieee, BLOCK_M=ca.BLOCK_M, BLOCK_N=ca.BLOCK_N)
    rows, cols = ca.cdiv(t, ca.BLOCK_M), ca.cdiv(t, ca.BLOCK_N)
    ca.attention_forward[(rows, b * heads)](
        qkv, cos, sin, out, lse, t, heads, kv_heads, dim, scale, **tiles)
    if broken == "forward":
        out[0, -1, 0] += 0.05
    ca.attention_delta[(rows, b * heads)](
        out, d_out, delta, t, heads, dim, FULL=full, BLOCK_M=ca.BLOCK_M)
    ca.attention_dkdv[(cols, b * kv_heads)](
        qkv, cos, sin, d_out, lse, delta, d_qkv, t, heads, kv_heads, dim, scale, **tiles)
    ca.attention_dq[(rows, b * heads)](
        qkv, cos, sin, d_out, lse, delta, d_qkv, t, heads, kv_heads, dim, scale, **tiles)
    if broken == "dq":
        d_qkv[0, -1, 0] += 0.05
    if broken == "dkdv":
        d_qkv[0, 0, heads * dim] += 0.05
    return out, d_qkv


def cross_entropy_kernels(logits, targets, scale, broken=None):
    """The two row passes as the CUDA build launches them: each row's log-sum-exp, then the
    gradient `scale * (softmax - onehot)` written over a copy of the logits."""
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32)
    ce.row_logsumexp[(rows,)](logits, lse, vocab, BLOCK_V=ce.BLOCK_V)
    if broken == "lse":
        lse[-1] += 1e-3
    grad = logits.clone()
    ce.softmax_gradient[(rows,)](grad, lse, targets, vocab, scale, BLOCK_V=ce.BLOCK_V)
    if broken == "grad":
        grad[-1, -1] += 0.02 * grad.abs().max()
    return lse, grad


def check_cross_entropy(case, dtype, broken):
    """The row passes against the math in float64 from the same rounded logits. Bounds: 1e-5
    for the log-sum-exp (f32 throughout); the gradient 1e-5 in f32, and in bf16 one rounding
    of the result to bf16 (2^-8 of the largest magnitude), which the reference's own
    bf16 gradient (its widened f32 softmax cast back) also carries."""
    rows, vocab = case
    torch.manual_seed(rows + vocab)
    # Logits of a trained model's spread (a few units), so the softmax is far from uniform.
    logits = (3 * torch.randn(rows, vocab, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), dtype=torch.int64)
    scale = 1.0 / (3 * rows)
    exact = logits.double()
    exact_lse = exact.logsumexp(-1)
    exact_grad = (exact - exact_lse[:, None]).exp()
    exact_grad[torch.arange(rows), targets] -= 1.0
    exact_grad *= scale
    # int32 here, u32 in the CUDA build: the same bits for ids below 2^31.
    lse, grad = cross_entropy_kernels(logits, targets.to(torch.int32), scale, broken)
    lse_error = ((lse.double() - exact_lse).abs().max() / exact_lse.abs().max()).item()
    result = {"case": dict(rows=rows, vocab=vocab), "dtype": str(dtype).removeprefix("torch."),
              "lse_error": lse_error, "gradient_error": error(grad, exact_grad)}
    bounds = (1e-5, 1e-5 if dtype == torch.float32 else 2.0 ** -8)
    result["bounds"] = bounds
    result["ok"] = lse_error <= bounds[0] and result["gradient_error"] <= bounds[1]
    return result


def row_kernels(x, w, dy, gu, dyg, eps, residual, broken=None):
    """RMSNorm's forward, dx and dw (its per-program parts summed in order, as the launch code
    does), the residual add fused in (forward: `x` as the stream, `dy` as the branch's output;
    backward: `dx` plus `residual`), and SwiGLU's forward and packed gradient, as the CUDA build
    launches them."""
    rows, n = x.shape
    inter = gu.shape[1] // 2
    y, dx = torch.empty_like(x), torch.empty_like(x)
    s, y_sum, dx_add = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    parts = ca.cdiv(rows, rn.ROWS)
    dw_part = torch.empty(parts, n, dtype=torch.float32)
    rn.rms_norm_forward[(rows,)](x, w, y, n, eps, BLOCK=rn.BLOCK)
    rn.rms_norm_dx[(rows,)](x, w, dy, dx, n, eps, BLOCK=rn.BLOCK)
    rn.add_rms_norm_forward[(rows,)](x, dy, w, s, y_sum, n, eps, BLOCK=rn.BLOCK)
    rn.rms_norm_dx_add[(rows,)](x, w, dy, residual, dx_add, n, eps, BLOCK=rn.BLOCK)
    rn.rms_norm_dw[(parts, ca.cdiv(n, rn.BLOCK))](x, dy, dw_part, rows, n, eps,
                                                   BLOCK=rn.BLOCK, ROWS=rn.ROWS)
    dw = dw_part.sum(0)             # f32, the weight's type
    out = torch.empty(rows, inter, dtype=gu.dtype)
    d_gu = torch.empty_like(gu)
    grid = (rows, ca.cdiv(inter, sg.BLOCK))
    sg.swiglu_forward[grid](gu, out, inter, BLOCK=sg.BLOCK)
    sg.swiglu_backward[grid](gu, dyg, d_gu, inter, BLOCK=sg.BLOCK)
    results = dict(rms_norm=y, rms_norm_dx=dx, rms_norm_dw=dw, add_rms_norm_sum=s,
                   add_rms_norm=y_sum, rms_norm_dx_add=dx_add, swiglu=out, swiglu_grad=d_gu)
    if broken in results:
        results[broken].view(-1)[-1] += 0.02 * results[broken].abs().max()
    return results


def check_rows(case, dtype, broken):
    """RMSNorm and SwiGLU, forward and backward, against the math in float64 from the same
    rounded inputs. Bounds: 1e-5 in f32 (f32 throughout); in bf16 one rounding of each result
    to bf16 (2^-8 of the largest magnitude), the kernels computing in f32."""
    rows, n = case
    torch.manual_seed(rows + n)
    eps = 1e-5
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64).to(dtype)  # noqa: E731
    x, dy, gu, dyg = draw(rows, n), draw(rows, n), draw(rows, 2 * n), draw(rows, n)
    w = torch.randn(n, dtype=torch.float64).to(torch.float32)   # f32 norm weights, as LLaMA's
    xe, we, gue = (t.double().requires_grad_() for t in (x, w, gu))
    ye = xe * (xe.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * we
    dxe, dwe = torch.autograd.grad(ye, (xe, we), dy.double())
    g, u = gue.split(n, -1)
    oute = torch.nn.functional.silu(g) * u
    (d_gue,) = torch.autograd.grad(oute, gue, dyg.double())
    residual = draw(rows, n)
    # The fused add's sum, and the norm of that sum as the stream holds it (rounded to the
    # rows' type, as the unfused add leaves it for the norm).
    se = x.double() + dy.double()
    sr = se.to(dtype).double()
    y_sum = sr * (sr.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w.double()
    exact = dict(rms_norm=ye, rms_norm_dx=dxe, rms_norm_dw=dwe, add_rms_norm_sum=se,
                 add_rms_norm=y_sum, rms_norm_dx_add=dxe + residual.double(), swiglu=oute,
                 swiglu_grad=d_gue)
    got = row_kernels(x, w, dy, gu, dyg, eps, residual, broken)
    bound = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    result = {"case": dict(rows=rows, width=n), "dtype": str(dtype).removeprefix("torch.")}
    result.update({f"{k}_error": error(got[k], exact[k].detach()) for k in exact})
    result["bound"] = bound
    result["ok"] = all(result[f"{k}_error"] <= bound for k in exact)
    return result


def pointer_table(*groups):
    """The device addresses of the tensors of `groups`, in order, as the launch code's
    `triton::pointer_table` uploads them (here the CPU addresses the interpreter follows)."""
    return torch.tensor([t.data_ptr() for group in groups for t in group], dtype=torch.int64)


def program_tables(programs):
    """`first` and `owner` (layouts: adam.py) for tensors of `programs[t]` programs each."""
    first = torch.tensor([0] + list(np.cumsum(programs))[:-1], dtype=torch.int32)
    owner = torch.cat([torch.full((p,), t, dtype=torch.int32) for t, p in enumerate(programs)])
    return first, owner


def optimizer_kernels(thetas, grads, moments, tensors, h, broken=None):
    """The update of every tensor in one launch (AdamW or Adam-mini by the blocks, in place on
    copies of `thetas` and `moments`) and the sum of squares of every gradient in one, as the CUDA
    build launches them: the hyper-parameters rounded once to f32 from the same f64 values as the
    CPU op's, the parts of the sum added in order."""
    thetas, moments = [t.clone() for t in thetas], [m.clone() for m in moments]
    sizes = torch.tensor([n for n, _, _ in tensors], dtype=torch.int64)
    blocks = [block for _, block, _ in tensors]
    decays = torch.tensor([int(d) for _, _, d in tensors], dtype=torch.int32)
    # f32 values as Python floats: the interpreter computes with a float argument unrounded (an
    # f32 kernel parameter on the GPU).
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    scalars = dict(beta1=f32(h["beta1"]), beta2=f32(h["beta2"]), eps=f32(h["eps"]),
                   keep=f32(1.0 - h["decay"]), step=f32(h["lr"] / h["bias1"]),
                   inv_bias2=f32(1.0 / h["bias2_sqrt"]), grad_scale=f32(h["grad_scale"]))
    kind = "adamw" if set(blocks) == {1} else "adam_mini"
    pointers = pointer_table(thetas, grads, moments)
    count = len(tensors)
    if kind == "adamw":
        first, owner = program_tables([ca.cdiv(n, adam.BLOCK) for n, _, _ in tensors])
        adam.adamw_multi[(owner.numel(),)](pointers, count, owner, first, sizes, decays,
                                           **scalars, BLOCK=adam.BLOCK)
    else:
        first, owner = program_tables([n // block for n, block, _ in tensors])
        inv_blocks = torch.tensor([f32(1.0 / b) for b in blocks], dtype=torch.float32)
        adam.adam_mini_multi[(owner.numel(),)](
            pointers, count, owner, first, sizes, torch.tensor(blocks, dtype=torch.int32),
            inv_blocks, decays, **scalars, BLOCK=adam.BLOCK)
    results = {"theta": thetas, "m": [m[:n] for m, (n, _, _) in zip(moments, tensors)],
               "v": [m[n:] for m, (n, _, _) in zip(moments, tensors)]}
    first, owner = program_tables([ca.cdiv(n, adam.BLOCK * adam.STEPS) for n, _, _ in tensors])
    part = torch.full((owner.numel(),), float("nan"), dtype=torch.float64)
    adam.sum_squares_multi[(part.numel(),)](pointer_table(grads), owner, first, sizes, part,
                                            BLOCK=adam.BLOCK, STEPS=adam.STEPS)
    total = torch.zeros((), dtype=torch.float64)
    for p in part:
        total += p
    results["sum_squares"] = [total.reshape(1)]
    for name, result in results.items():
        if broken in (f"{kind}_{name}", name):
            # The second tensor's (the only one for the sum): a wrong offset or a wrong tensor
            # shows in one tensor, not all.
            one = result[min(1, len(result) - 1)]
            one.view(-1)[-1] += 0.02 * one.abs().max()
    return results


def check_optimizer(case, dtype, broken):
    """One Adam update of every tensor of `case` (AdamW, or Adam-mini per block) and the sum of
    squares of all their gradients against the math in float64 from the same f32 inputs and the
    unrounded hyper-parameters: step 3, a learning rate (0.1) that makes the update as large as
    the parameters, weight decay on some tensors, a clip scale. Errors: the worst over the
    tensors, each relative to its own largest magnitude. Bounds: 1e-6 for each result (f32
    throughout), 1e-12 for the sum (f64)."""
    torch.manual_seed(sum(n + block for n, block, _ in case))
    lr, beta1, beta2, t = 0.1, 0.9, 0.95, 3
    h = dict(lr=lr, beta1=beta1, beta2=beta2, eps=1e-8, decay=lr * 0.1, grad_scale=0.7,
             bias1=1.0 - beta1 ** t, bias2_sqrt=math.sqrt(1.0 - beta2 ** t))
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    thetas = [draw(n).to(dtype) for n, _, _ in case]
    grads = [draw(n).to(dtype) for n, _, _ in case]
    moments = [torch.cat([0.1 * draw(n), 0.05 * draw(n // block) ** 2]).to(dtype)
               for n, block, _ in case]
    exact = {"theta": [], "m": [], "v": []}
    for theta, grad, moment, (n, block, decays) in zip(thetas, grads, moments, case):
        g = grad.double() * h["grad_scale"]
        m = beta1 * moment[:n].double() + (1 - beta1) * g
        v = beta2 * moment[n:].double() + (1 - beta2) * (g * g).reshape(-1, block).mean(1)
        denominator = v.sqrt() / h["bias2_sqrt"] + h["eps"]
        update = (m.reshape(-1, block) / denominator[:, None]).reshape(-1) * (lr / h["bias1"])
        keep = 1 - h["decay"] if decays else 1.0
        for name, value in (("theta", theta.double() * keep - update), ("m", m), ("v", v)):
            exact[name].append(value)
    exact["sum_squares"] = [sum((g.double() ** 2).sum() for g in grads).reshape(1)]
    got = optimizer_kernels(thetas, grads, moments, case, h, broken)
    result = {"case": [dict(n=n, block=block, decays=d) for n, block, d in case],
              "dtype": str(dtype).removeprefix("torch."),
              "kernel": "adamw_multi" if case[0][1] == 1 else "adam_mini_multi"}
    result.update({f"{k}_error": max(error(a, b) for a, b in zip(got[k], exact[k]))
                   for k in exact})
    bounds = dict(theta=1e-6, m=1e-6, v=1e-6, sum_squares=1e-12)
    result["bounds"] = bounds
    result["ok"] = all(result[f"{k}_error"] <= bounds[k] for k in exact)
    return result


def bsfa_kernels(afters, befores, directions, alpha, gamma, broken=None):
    """BSFA's projection of every block in three launches, as the CUDA build runs it: tables of
    addresses and sizes, `afters` updated in place; returns the blocks' updates."""
    count = len(afters)
    numel = torch.tensor([a.numel() for a in afters], dtype=torch.int64)
    rank = torch.tensor([0 if u is None else u.shape[0] for u in directions], dtype=torch.int32)
    programs = [ca.cdiv(a.numel(), bsfa.CHUNK) for a in afters]
    first = torch.tensor([0] + list(np.cumsum(programs)), dtype=torch.int32)
    offset = torch.tensor([0] + list(np.cumsum(numel.tolist())[:-1]), dtype=torch.int64)
    addresses = lambda ts: torch.tensor(  # noqa: E731
        [0 if t is None else t.data_ptr() for t in ts], dtype=torch.int64)
    total = int(first[-1])
    update = torch.full((int(numel.sum()),), float("nan"))
    parts = torch.full((total, bsfa.K), float("nan"))
    coordinates = torch.full((count, bsfa.K), float("nan"))
    tiles = dict(K=bsfa.K, CHUNK=bsfa.CHUNK, COLS=bsfa.COLS, SEARCH=bsfa.SEARCH)
    a, u = addresses(afters), addresses(directions)
    bsfa.bsfa_coordinates[(total,)](a, addresses(befores), u, numel, offset, rank, first,
                                    update, parts, count, **tiles)
    if broken == "bsfa_coordinates":
        parts[-1, 0] += 0.1
    bsfa.bsfa_coordinate_sum[(count,)](parts, first, coordinates, float(np.float32(alpha - gamma)),
                                       K=bsfa.K)
    bsfa.bsfa_apply[(total,)](a, u, numel, offset, rank, first, update, coordinates, count,
                              float(np.float32(gamma - 1)), **tiles)
    if broken == "bsfa_update":
        update[-1] += 0.02 * update.abs().max()
    if broken == "bsfa_apply":
        afters[-1][-1] += 0.02 * afters[-1].abs().max()
    return [update[o:o + n] for o, n in zip(offset.tolist(), numel.tolist())]


def check_bsfa(case, dtype, broken):
    """One step's projection of every block (alpha 0.2, gamma 2: both terms count) against the
    math in float64 from the same f32 inputs, with orthonormal directions as re-estimation
    gives. Bound 1e-6 for each block's parameter and update (f32 throughout)."""
    torch.manual_seed(sum(n + k for n, k in case))
    alpha, gamma = 0.2, 2.0
    befores = [torch.randn(n, dtype=torch.float64).to(dtype) for n, _ in case]
    afters = [(b.double() + 0.01 * torch.randn(b.numel(), dtype=torch.float64)).to(dtype)
              for b in befores]
    directions = [None if k == 0 else
                  torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].T.contiguous()
                  .to(dtype) for n, k in case]
    exact_theta, exact_update = [], []
    for a, b, u in zip(afters, befores, directions):
        v = a.double() - b.double()
        exact_update.append(v)
        if u is None:
            exact_theta.append(a.double())
        else:
            c = (alpha - gamma) * (u.double() @ v)
            exact_theta.append(a.double() + (gamma - 1) * v + u.double().T @ c)
    updates = bsfa_kernels(afters, befores, directions, alpha, gamma, broken)
    result = {"case": [dict(numel=n, k=k) for n, k in case],
              "dtype": str(dtype).removeprefix("torch."), "kernel": "bsfa_projection",
              "theta_error": max(error(a, t) for a, t in zip(afters, exact_theta)),
              "update_error": max(error(v, t) for v, t in zip(updates, exact_update)),
              "bound": 1e-6}
    result["ok"] = max(result["theta_error"], result["update_error"]) <= 1e-6
    return result


def error(got, truth):
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


def check(case, dtype, broken):
    b, t, heads, kv_heads, dim = case
    torch.manual_seed(sum(case))
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(b, t, width, dtype=torch.float64).to(dtype)
    d_out = torch.randn(b, t, heads * dim, dtype=torch.float64).to(dtype)
    cos, sin = tables(t, dim, dtype)
    # The math: float64 from the same (rounded) inputs.
    exact_in = qkv.double().requires_grad_()
    exact = attention(exact_in, cos.double(), sin.double(), heads, kv_heads, dim)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, d_out.double())
    out, d_qkv = kernels(qkv, cos, sin, d_out, heads, kv_heads, dim, broken)
    result = {"case": dict(zip(("batch", "seq", "heads", "kv_heads", "dim"), case)),
              "dtype": str(dtype).removeprefix("torch."),
              "forward_error": error(out, exact), "backward_error": error(d_qkv, exact_grad)}
    if dtype == torch.float32:
        bounds = (1e-5, 1e-5)
    else:
        ref_in = qkv.clone().requires_grad_()
        ref = attention(ref_in, cos, sin, heads, kv_heads, dim, widen=torch.float32)
        (ref_grad,) = torch.autograd.grad(ref, ref_in, d_out)
        reference = (error(ref, exact), error(ref_grad, exact_grad))
        result["reference_errors"] = reference
        bounds = tuple(e + 1e-4 for e in reference)
    result["bounds"] = bounds
    result["ok"] = result["forward_error"] <= bounds[0] and result["backward_error"] <= bounds[1]
    return result


# Each family of kernels: its check, its cases, the kernels --break can perturb in it, and the
# operand types it is checked in.
BOTH = (torch.float32, torch.bfloat16)
FAMILIES = [
    (check, CASES, ("forward", "dq", "dkdv"), BOTH),
    (check_cross_entropy, CROSS_ENTROPY_CASES, ("lse", "grad"), BOTH),
    (check_rows, ROW_CASES, ("rms_norm", "rms_norm_dx", "rms_norm_dw", "add_rms_norm_sum",
                             "add_rms_norm", "rms_norm_dx_add", "swiglu", "swiglu_grad"), BOTH),
    (check_optimizer, OPTIMIZER_CASES, ("adamw_theta", "adamw_m", "adamw_v", "adam_mini_theta",
                                        "adam_mini_m", "adam_mini_v", "sum_squares"),
     (torch.float32,)),
    (check_bsfa, BSFA_CASES, ("bsfa_coordinates", "bsfa_update", "bsfa_apply"), (torch.float32,)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--break", dest="broken",
                        choices=[k for _, _, kernels, _ in FAMILIES for k in kernels])
    parser.add_argument("--cases", type=int, default=len(CASES), help="the first N cases only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mend_interpreter_bf16()
    failed = 0
    for check_case, cases, kernels, dtypes in FAMILIES:
        # A broken kernel is looked for in its own family only.
        if args.broken and args.broken not in kernels:
            continue
        for case in cases[:args.cases]:
            for dtype in dtypes:
                result = check_case(case, dtype, args.broken)
                print(json.dumps(result), flush=True)
                failed += not result["ok"]
    print(f"{failed} case(s) beyond tolerance", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
