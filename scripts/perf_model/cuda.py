"""The kernels of ours a CUDA run launches today (issue #25), as candle `CustomOp` nodes: what
each launches, moves and keeps alive, forward and backward. `forward(d, weights, kernels)` takes
them for the names in `kernels`; the reference ops run the rest.

- "attention": the Triton FlashAttention-2 kernels (src/model/ops/triton/causal_attention.py)
  over the packed q/k/v projection, RoPE applied on load (so no RoPE ops remain).
- "embedding": candle's `index_select` forward, our embedding.cu backward.
- "cross_entropy": the output head fused with the cross-entropy, chunked over rows, gradients
  made in the forward (Liger's scheme).
- "rms_norm": RMSNorm's Triton kernels (rms_norm.py) on the bf16 rows with f32 weights.
- "residual_rms_norm": the residual add fused into the RMSNorm after it (add_rms_norm_forward)
  and the residual stream's gradient into the norm's dx pass (rms_norm_dx_add).
- "swiglu": the gate and up projections as one linear layer, SwiGLU's Triton kernels
  (swiglu.py) on its packed output.
"""
from .backward import Grad, temp_done
from .hw import EFF_BW, HBM, HD, MIN_KERNEL, PEAK_BF16, prod
from .sim import S, cat, custom, matmul, reshape, transpose

# The kernels, in the names `forward`'s `kernels` takes.
KERNELS = ("attention", "embedding", "cross_entropy", "rms_norm", "residual_rms_norm", "swiglu")

ATTENTION = "attention (scores, softmax, heads)"
HEAD = "output head + cross-entropy"

# FlashAttention-2-class kernels on H100 at head dim 64, causal, seq 1k (assumption), scaled by
# 48/64: head dim 48 runs masked in the 64-wide tile. FLOP/s of the matrix products each runs.
FA_FWD = 250e12 * HD / 64
FA_BWD = 170e12 * HD / 64

# The fused cross-entropy's row chunk: its logits take at most this much in the compute type.
CE_CHUNK_BYTES = 256 * 2**20


def roofline(flops, nbytes, rate):
    """A kernel's time at `rate` FLOP/s or at the bandwidth, whichever binds."""
    return max(flops / rate, nbytes / (HBM * EFF_BW), MIN_KERNEL)


def linear(x, w):
    """ops::linear::reference::linear on CUDA (the fused linear is CPU-only)."""
    rows = prod(x.shape[:-1])
    S.group, prev = "linear GEMMs", S.group
    out = reshape(matmul(reshape(x, (rows, x.shape[-1])), transpose(w, 0, 1)),
                  x.shape[:-1] + (w.shape[0],))
    S.group = prev
    return out


def attention(d, x, wq, wk, wv):
    """ops::attention on CUDA: the three projections as one linear layer over the weights
    concatenated (`Tensor::cat`, a copy per micro-batch), then the Triton kernels reading the
    packed output in place. The forward keeps each row's log-sum-exp; the backward runs
    `attention_delta`, then `attention_dkdv` per key block and `attention_dq` per query
    block, each recomputing the probabilities (deterministic, no atomics): 7 of the head's
    matrix products where FlashAttention-2 runs 5, so 3.5 forwards of FLOPs."""
    S.group = "linear GEMMs"
    qkv = linear(x, cat([wq, wk, wv], 0))
    S.group = ATTENTION
    causal = 2.0 * d.B * d.H * d.T * d.T * d.HD     # QK^T and PV over the causal half
    lse = 4 * d.B * d.H * d.T

    def backward(bw, node, grad):
        # d_out.contiguous() and out.contiguous() are no-ops: both are contiguous
        delta = Grad((d.B * d.H * d.T,), "f32")
        S.k("attention-delta", nbytes=2 * node.nbytes + delta.nbytes)
        d_qkv = Grad(qkv.shape, qkv.dtype)
        moved = qkv.nbytes + node.nbytes + 2 * lse
        S.k("attention-dkdv", flops=2 * causal, nbytes=moved + d_qkv.nbytes * 2 / 3,
            gpu=roofline(2 * causal, moved + d_qkv.nbytes * 2 / 3, FA_BWD))
        S.k("attention-dq", flops=1.5 * causal, nbytes=moved + d_qkv.nbytes / 3,
            gpu=roofline(1.5 * causal, moved + d_qkv.nbytes / 3, FA_BWD))
        temp_done(delta)
        S.free(lse)                                 # the op's row statistics, taken
        bw.accumulate(qkv, d_qkv)
        temp_done(d_qkv)

    out = custom([qkv], (d.B, d.T, d.H * d.HD), qkv.dtype, backward)
    S.alloc(lse)
    S.kept[S.group] += lse
    S.k("attention-forward", flops=causal, nbytes=qkv.nbytes + out.nbytes + lse,
        gpu=roofline(causal, qkv.nbytes + out.nbytes + lse, FA_FWD))
    return out


def embedding(d, w):
    """ops::embedding off the fused path: candle's `index_select` forward; the backward is
    embedding.cu, one block per vocabulary row (it zero-fills its row, scans all N ids, from
    L2 taken as 4x HBM, and adds the rows of dy whose id it is), no atomics."""
    S.group = "embedding"

    def backward(bw, node, grad):
        # dy.contiguous() is a no-op: the gradient is contiguous
        dw = Grad(w.shape, w.dtype)
        S.k("embedding-backward", nbytes=dw.nbytes + grad.nbytes,
            gpu=(dw.nbytes + grad.nbytes) / (HBM * EFF_BW) + 4 * d.V * d.N / (4 * HBM) + 20e-6)
        bw.accumulate(w, dw)
        temp_done(dw)

    out = custom([w], (d.N, d.C), w.dtype, backward)
    S.k("index_select", nbytes=2 * out.nbytes + d.N * 4)
    return out


def chunk_rows(d):
    """Rows per chunk of the fused cross-entropy: the chunk's bf16 logits within
    CE_CHUNK_BYTES, a multiple of 128 (at least 128)."""
    return max(128, CE_CHUNK_BYTES // (2 * d.V) // 128 * 128)


def linear_cross_entropy(d, x, w):
    """ops::linear_cross_entropy on CUDA, `x` (N x C) and `w` (V x C) in bf16. Per chunk of
    R rows: a cuBLAS GEMM writes the bf16 logits (R x V); a Triton kernel reads them and
    writes each row's f32 log-sum-exp; candle's gather reads the target logits (and small
    ops add the chunk's loss); a second Triton kernel turns the chunk into (softmax -
    onehot) / N in place; dx_chunk = dlogits W, and dW += dlogits^T x_chunk as a bf16
    product cast to f32 and added (two passes over V x C). At the end dW goes back to bf16.
    The op keeps dx and dW for the backward, which scales each by the upstream gradient."""
    S.group = HEAD
    rows = chunk_rows(d)
    vc = d.V * d.C

    def backward(bw, node, grad):
        for arg in (x, w):
            g = Grad(arg.shape, arg.dtype)
            S.k("h2d-layout", gpu=MIN_KERNEL)        # the scalar broadcast
            S.k("mul", nbytes=arg.nbytes + g.nbytes)
            S.free(arg.nbytes)                      # the op's dx or dW, taken
            bw.accumulate(arg, g)
            temp_done(g)

    loss = custom([x, w], (), "f32", backward)
    S.alloc(x.nbytes)                               # dx, written chunk by chunk
    acc = 4 * vc                                    # dW in f32
    S.alloc(acc)
    for first in range(0, d.N, rows):
        r = min(rows, d.N - first)
        logits = 2 * r * d.V
        S.alloc(logits + 4 * r)
        S.k("gemm", flops=2.0 * r * vc, nbytes=2 * (r * d.C + vc) + logits, peak=PEAK_BF16)
        S.k("ce-lse", nbytes=logits + 4 * r)
        S.k("gather", nbytes=r * (4 + 2 + 2))
        for kind in ("cast", "sub", "reduce-sum", "add"):   # the chunk's loss, added up
            S.k(kind, nbytes=r * 8)
        S.k("ce-grad", nbytes=2 * logits + 8 * r)
        S.k("gemm", flops=2.0 * r * vc, nbytes=logits + 2 * vc + 2 * r * d.C, peak=PEAK_BF16)
        S.alloc(2 * vc)                             # dlogits^T x_chunk in bf16
        S.k("gemm", flops=2.0 * r * vc, nbytes=logits + 2 * r * d.C + 2 * vc, peak=PEAK_BF16)
        S.alloc(4 * vc)
        S.k("cast", nbytes=6 * vc)
        S.free(2 * vc)
        S.alloc(4 * vc)
        S.k("add", nbytes=12 * vc)
        S.free(8 * vc)                              # the old sum and the widened product
        S.free(logits + 4 * r)
    S.alloc(2 * vc)
    S.k("cast", nbytes=6 * vc)                      # dW to bf16, kept for the backward
    S.free(acc)
    S.k("affine", nbytes=8)                         # the mean
    S.kept[S.group] += x.nbytes + 2 * vc
    return loss


def ce_extra_bytes(d):
    """The fused cross-entropy's peak beyond its inputs: dx, the f32 dW sum, one chunk's
    logits and row statistics, while the old sum, the widened product and the new sum are
    alive together (12 bytes per weight)."""
    return 2 * d.N * d.C + chunk_rows(d) * (2 * d.V + 4) + 12 * d.V * d.C


def rms_norm(x, w):
    """Llama::norm with ops::rms_norm on CUDA: `rms_norm_forward` on the bf16 rows with the f32
    weight (one program per row: reads the row twice, writes y in bf16), no casts. Backward:
    `rms_norm_dx` (reads x, dy twice and w, writes dx in bf16) and `rms_norm_dw` (reads x twice
    and dy, writes f32 parts per 64 rows), the parts summed by candle's reduction (f32, the
    weight's type)."""
    S.group = "RMSNorm"
    rows, n = prod(x.shape[:-1]), x.shape[-1]
    parts = -(-rows // 64) * n * 4

    def backward(bw, node, grad):
        dx, dw = Grad(x.shape, x.dtype), Grad(w.shape, w.dtype)
        S.k("rms-norm-dx", nbytes=2 * x.nbytes + 2 * grad.nbytes + dx.nbytes + w.nbytes)
        S.alloc(parts)
        S.k("rms-norm-dw", nbytes=2 * x.nbytes + grad.nbytes + parts)
        S.k("reduce-sum", nbytes=parts + 4 * n)
        S.free(parts)
        bw.accumulate(x, dx)
        bw.accumulate(w, dw)
        temp_done(dx, dw)

    y = custom([x, w], x.shape, x.dtype, backward)
    S.k("rms-norm-forward", nbytes=3 * x.nbytes + w.nbytes)
    return y


def add_rms_norm(x, delta, w):
    """ops::add_rms_norm on CUDA: `add_rms_norm_forward` reads x and delta, writes the sum and
    its norm (bf16; the sum read back from the cache); the add's backward passes its gradient
    to both operands (moved in); the norm's backward as `rms_norm`'s, except that where the sum
    already has a gradient (the residual stream's) `rms_norm_dx_add` reads it and writes the
    sum, which the store keeps in place of its add."""
    S.group = "RMSNorm"
    rows, n = prod(x.shape[:-1]), x.shape[-1]
    parts = -(-rows // 64) * n * 4

    def add_backward(bw, node, grad):
        bw.accumulate(x, grad)
        bw.accumulate(delta, grad)

    s = custom([x, delta], x.shape, x.dtype, add_backward)

    def norm_backward(bw, node, grad):
        existing = bw.store.get(s.id)
        dx, dw = Grad(s.shape, s.dtype), Grad(w.shape, w.dtype)
        residual = existing.nbytes if existing is not None else 0
        S.k("rms-norm-dx", nbytes=2 * s.nbytes + 2 * grad.nbytes + dx.nbytes + w.nbytes
            + residual)
        S.alloc(parts)
        S.k("rms-norm-dw", nbytes=2 * s.nbytes + grad.nbytes + parts)
        S.k("reduce-sum", nbytes=parts + 4 * n)
        S.free(parts)
        if existing is not None:
            bw.store[s.id] = Grad(s.shape, s.dtype)     # dx, moved in for the old one
            S.free(existing.nbytes)
        else:
            bw.accumulate(s, dx)
        bw.accumulate(w, dw)
        temp_done(dx, dw)

    y = custom([s, w], x.shape, x.dtype, norm_backward)
    S.k("add-rms-norm-forward", nbytes=4 * x.nbytes + w.nbytes)
    return s, y


def swiglu(x, w_gate, w_up):
    """ops::swiglu on CUDA: the two projections as one linear layer over the weights
    concatenated (`Tensor::cat`, a copy per micro-batch), `swiglu_forward` on the packed
    output (reads gate and up, writes the product); backward `swiglu_backward` (reads the
    packed output and dy, writes the packed gradient)."""
    S.group = "linear GEMMs"
    gu = linear(x, cat([w_gate, w_up], 0))
    S.group = "SwiGLU (silu, product)"

    def backward(bw, node, grad):
        d_gu = Grad(gu.shape, gu.dtype)
        S.k("swiglu-backward", nbytes=gu.nbytes + grad.nbytes + d_gu.nbytes)
        bw.accumulate(gu, d_gu)
        temp_done(d_gu)

    out = custom([gu], gu.shape[:-1] + (gu.shape[-1] // 2,), gu.dtype, backward)
    S.k("swiglu-forward", nbytes=gu.nbytes + out.nbytes)
    return out
