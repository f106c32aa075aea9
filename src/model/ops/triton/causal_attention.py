"""LLaMA's causal self-attention on the GPU as Triton kernels: the same op as the fused CPU
kernel of `causal_attention.rs` (rotary embeddings applied to the queries and keys as they are
read, queries scaled by 1/sqrt(head_dim), grouped-query heads), FlashAttention-2's scheme: no
`batch x heads x seq x seq` tensor is ever made; the forward keeps each row's log-sum-exp for the
backward, which recomputes the probabilities tile by tile.

Layouts (all contiguous, row-major; element strides):
  qkv   batch x seq x (heads + 2 kv_heads) * dim: each row `[q (heads*dim) | k (kv*dim) | v]`,
        the packed output of the fused q/k/v projection, read in place (no head transposes)
  cos, sin   seq x dim (the frequencies laid out twice, rotate-half layout), any float type
  out   batch x seq x heads * dim, qkv's type
  lse   batch x heads x seq, f32: the log-sum-exp of each row of scaled scores
  delta batch x heads x seq, f32: rowsum(d_out * out), the backward's first pass
  d_qkv like qkv: the q columns written by `attention_dq`, the k and v columns by `attention_dkdv`

Precision: bf16 (or f32) operands, f32 accumulation and softmax. In bf16 the rotated, scaled
queries, the rotated keys and the probabilities are rounded to bf16 before each product, as the
reference composition rounds them (the scores stay f32, where the reference rounds them to bf16
too); f32 products use full f32 (`input_precision="ieee"`), not TF32.

The backward is deterministic (no atomics): d_k and d_v of a key block are summed by one program
over the query blocks and the heads of its group in a fixed order, and d_q of a query block by one
program over the key blocks. Head dims up to 128 run in tiles of `FULL` = 64 or 128 columns (the
two rotate-half halves in `HALF` = FULL / 2), the columns beyond `dim` masked; sequence lengths
need not be multiples of the tiles.

Grids: forward, delta and dq (cdiv(seq, BLOCK_M), batch * heads); dkdv (cdiv(seq, BLOCK_N),
batch * kv_heads). Block: 32 x num_warps threads (see `aot.py`).
"""

import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _load_rotated(base, rows, row_stride, cos, sin, seq, dim, HALF: tl.constexpr):
    """The two rotate-half halves of the `rows x dim` head at `base`, rotated: f32."""
    half = dim // 2
    cols = tl.arange(0, HALF)
    mask = (rows[:, None] < seq) & (cols[None, :] < half)
    at = base + rows[:, None] * row_stride + cols[None, :]
    x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(at + half, mask=mask, other=0.0).to(tl.float32)
    table = rows[:, None] * dim + cols[None, :]
    c = tl.load(cos + table, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin + table, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _unrotate_store(base, rows, row_stride, cos, sin, seq, dim, g1, g2, HALF: tl.constexpr):
    """Stores the gradient of the unrotated head from `g1`, `g2`, the gradient of the rotated
    halves: the rotation's transpose."""
    half = dim // 2
    cols = tl.arange(0, HALF)
    mask = (rows[:, None] < seq) & (cols[None, :] < half)
    table = rows[:, None] * dim + cols[None, :]
    c = tl.load(cos + table, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin + table, mask=mask, other=0.0).to(tl.float32)
    at = base + rows[:, None] * row_stride + cols[None, :]
    ty = base.dtype.element_ty
    tl.store(at, (g1 * c + g2 * s).to(ty), mask=mask)
    tl.store(at + half, (g2 * c - g1 * s).to(ty), mask=mask)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _query_block(qkv, cos, sin, seq, heads, kv_heads, dim, scale,
                 HALF: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query block (grid (query blocks, batch * heads)): its batch, head and
    key/value head, the packed row width, the batch's first row, the block's row indices and
    its rotated, scaled queries in the operand type."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    g = h // (heads // kv_heads)
    width = (heads + 2 * kv_heads) * dim
    base = qkv + b * seq * width
    ty = qkv.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_rotated(base + h * dim, rows, width, cos, sin, seq, dim, HALF)
    return b, h, g, width, base, rows, (q1 * scale).to(ty), (q2 * scale).to(ty)


@triton.jit
def attention_forward(qkv, cos, sin, out, lse, seq, heads, kv_heads, dim, scale,
                      HALF: tl.constexpr, FULL: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h, g, width, base, rows, q1, q2 = _query_block(
        qkv, cos, sin, seq, heads, kv_heads, dim, scale, HALF, BLOCK_M)
    ty = qkv.dtype.element_ty
    full = tl.arange(0, FULL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, FULL], tl.float32)
    end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, seq)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k1, k2 = _load_rotated(base + (heads + g) * dim, cols, width, cos, sin, seq, dim, HALF)
        scores = _dot(q1, tl.trans(k1.to(ty)), IEEE) + _dot(q2, tl.trans(k2.to(ty)), IEEE)
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < seq)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_at = base + (heads + kv_heads + g) * dim + cols[:, None] * width + full[None, :]
        v = tl.load(v_at, mask=(cols[:, None] < seq) & (full[None, :] < dim), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(ty), v, IEEE)
        m_i = m_new
    result = acc / l_i[:, None]
    out_width = heads * dim
    out_at = out + b * seq * out_width + rows[:, None] * out_width + h * dim + full[None, :]
    tl.store(out_at, result.to(ty), mask=(rows[:, None] < seq) & (full[None, :] < dim))
    tl.store(lse + (b * heads + h) * seq + rows, m_i + tl.log(l_i), mask=rows < seq)


@triton.jit
def attention_delta(out, d_out, delta, seq, heads, dim,
                    FULL: tl.constexpr, BLOCK_M: tl.constexpr):
    m_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    full = tl.arange(0, FULL)
    width = heads * dim
    at = b * seq * width + rows[:, None] * width + h * dim + full[None, :]
    mask = (rows[:, None] < seq) & (full[None, :] < dim)
    o = tl.load(out + at, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(d_out + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + bh * seq + rows, tl.sum(o * do, 1), mask=rows < seq)


@triton.jit
def _probabilities(q1, q2, k1, k2, rows, cols, lse_rows, seq, IEEE: tl.constexpr):
    """exp(scores - lse): the forward's probabilities of one tile, recomputed."""
    scores = _dot(q1, tl.trans(k1), IEEE) + _dot(q2, tl.trans(k2), IEEE)
    visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < seq) & (rows[:, None] < seq)
    return tl.where(visible, tl.exp(scores - lse_rows[:, None]), 0.0)


@triton.jit
def attention_dkdv(qkv, cos, sin, d_out, lse, delta, d_qkv, seq, heads, kv_heads, dim, scale,
                   HALF: tl.constexpr, FULL: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_block = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // kv_heads
    g = bg % kv_heads
    group = heads // kv_heads
    width = (heads + 2 * kv_heads) * dim
    base = qkv + b * seq * width
    ty = qkv.dtype.element_ty
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    full = tl.arange(0, FULL)
    k1, k2 = _load_rotated(base + (heads + g) * dim, cols, width, cos, sin, seq, dim, HALF)
    k1 = k1.to(ty)
    k2 = k2.to(ty)
    kv_mask = (cols[:, None] < seq) & (full[None, :] < dim)
    v_at = base + (heads + kv_heads + g) * dim + cols[:, None] * width + full[None, :]
    v = tl.load(v_at, mask=kv_mask, other=0.0)
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, FULL], tl.float32)
    out_width = heads * dim
    first = (n_block * BLOCK_N // BLOCK_M) * BLOCK_M
    for h in range(g * group, (g + 1) * group):
        for m0 in range(first, seq, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q1, q2 = _load_rotated(base + h * dim, rows, width, cos, sin, seq, dim, HALF)
            q1 = (q1 * scale).to(ty)
            q2 = (q2 * scale).to(ty)
            stats = (b * heads + h) * seq + rows
            lse_rows = tl.load(lse + stats, mask=rows < seq, other=0.0)
            delta_rows = tl.load(delta + stats, mask=rows < seq, other=0.0)
            p = _probabilities(q1, q2, k1, k2, rows, cols, lse_rows, seq, IEEE)
            do_at = d_out + b * seq * out_width + rows[:, None] * out_width + h * dim
            do = tl.load(do_at + full[None, :],
                         mask=(rows[:, None] < seq) & (full[None, :] < dim), other=0.0)
            dv += _dot(tl.trans(p.to(ty)), do, IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            ds = (p * (dp - delta_rows[:, None])).to(ty)
            dk1 += _dot(tl.trans(ds), q1, IEEE)
            dk2 += _dot(tl.trans(ds), q2, IEEE)
    d_base = d_qkv + b * seq * width
    _unrotate_store(d_base + (heads + g) * dim, cols, width, cos, sin, seq, dim, dk1, dk2, HALF)
    dv_at = d_base + (heads + kv_heads + g) * dim + cols[:, None] * width + full[None, :]
    tl.store(dv_at, dv.to(ty), mask=kv_mask)


@triton.jit
def attention_dq(qkv, cos, sin, d_out, lse, delta, d_qkv, seq, heads, kv_heads, dim, scale,
                 HALF: tl.constexpr, FULL: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h, g, width, base, rows, q1, q2 = _query_block(
        qkv, cos, sin, seq, heads, kv_heads, dim, scale, HALF, BLOCK_M)
    ty = qkv.dtype.element_ty
    full = tl.arange(0, FULL)
    stats = (b * heads + h) * seq + rows
    lse_rows = tl.load(lse + stats, mask=rows < seq, other=0.0)
    delta_rows = tl.load(delta + stats, mask=rows < seq, other=0.0)
    out_width = heads * dim
    do_at = d_out + b * seq * out_width + rows[:, None] * out_width + h * dim + full[None, :]
    do = tl.load(do_at, mask=(rows[:, None] < seq) & (full[None, :] < dim), other=0.0)
    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, seq)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k1, k2 = _load_rotated(base + (heads + g) * dim, cols, width, cos, sin, seq, dim, HALF)
        k1 = k1.to(ty)
        k2 = k2.to(ty)
        v_at = base + (heads + kv_heads + g) * dim + cols[:, None] * width + full[None, :]
        v = tl.load(v_at, mask=(cols[:, None] < seq) & (full[None, :] < dim), other=0.0)
        p = _probabilities(q1, q2, k1, k2, rows, cols, lse_rows, seq, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = (p * (dp - delta_rows[:, None])).to(ty)
        dq1 += _dot(ds, k1, IEEE)
        dq2 += _dot(ds, k2, IEEE)
    d_base = d_qkv + b * seq * width + h * dim
    _unrotate_store(d_base, rows, width, cos, sin, seq, dim, dq1 * scale, dq2 * scale, HALF)


def tiles(dim):
    """(HALF, FULL) for a head dim: the smallest FULL of 64 and 128 that holds it."""
    if dim % 2 or not 2 <= dim <= 128:
        raise ValueError(f"head dim {dim}: the kernels take even head dims up to 128")
    full = 64 if dim <= 64 else 128
    return full // 2, full


def cdiv(a, b):
    return (a + b - 1) // b
