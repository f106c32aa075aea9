"""The optimizer's fused update on the GPU as Triton kernels: the same op as the fused CPU kernel
`AdamUpdate` of `src/optim/fused.rs` (AdamW, and Adam-mini with one second moment per block of
`block` consecutive elements), and the gradient norm's sum of squares (`SumSquares`).

    g  = grad * grad_scale
    m' = beta1 m + (1 - beta1) g
    v' = beta2 v + (1 - beta2) g^2              (Adam-mini: the mean of g^2 over the block)
    p' = p keep - step m' / (sqrt(v') inv_bias2 + eps)

with `keep = 1 - lr * weight_decay`, `step = lr / (1 - beta1^t)`, `inv_bias2 = 1 /
sqrt(1 - beta2^t)` (PyTorch's AdamW), each rounded once to f32 by the launch code as the CPU op
rounds them, and the operations in the CPU op's order: AdamW divides per element,
`p keep - (step m') / denominator`; Adam-mini divides once per block, `p keep - (step /
denominator) m'`, and sums the raw squares before scaling them by `grad_scale^2`.

Layouts (contiguous; element offsets):
  theta, grad   n, f32
  moments       n + n / block, f32: `[m (n) | v (n / block)]`
  out           2 n + n / block, f32: `[p' (n) | m' (n) | v' (n / block)]`, the CPU op's packing
  x             n, f32: `sum_squares_part`'s input (a gradient)
  part          cdiv(n, BLOCK * STEPS) (at least 1), f64: each program's sum of x^2 over its
                BLOCK * STEPS elements (the launch code adds them in a fixed order: no atomics,
                deterministic)

Precision: f32 throughout (parameters and moments are f32 in every run), the square root and the
divisions IEEE round-to-nearest (`sqrt_rn`, `div_rn`, not the approximate ones) and no fused
multiply-adds (`aot.py` compiles these kernels with fp fusion off): AdamW's per-element result is
the CPU op's f32 arithmetic, operation for operation; Adam-mini's block sum of squares is a tree
sum of f32 squares (the CPU's: eight lanes in order), so it differs from the CPU's in rounding
only. `sum_squares_part` squares and sums in f64, as the CPU op does (an f32 square is exact in
f64).

Two update kernels, not one with a constexpr: their grids and their loops differ (AdamW one
program per BLOCK elements, no reduction; Adam-mini one program per block of any size, two passes
over it), as the CPU op's two loops do, and each has only the parameters it reads.

Grids: adamw_update (cdiv(n, BLOCK),); adam_mini_update (n / block,), one program per block,
looping over it in chunks of BLOCK (any block size); sum_squares_part (cdiv(n, BLOCK * STEPS),)
(at least 1). Block: 32 x num_warps threads (see `aot.py`).
"""

import triton
import triton.language as tl

BLOCK = 1024
STEPS = 16


@triton.jit
def adamw_update(theta, grad, moments, out, n, beta1, beta2, eps, keep, step, inv_bias2,
                 grad_scale, BLOCK: tl.constexpr):
    """AdamW (one second moment per element) for BLOCK elements."""
    n = n.to(tl.int64)
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < n
    p = tl.load(theta + at, mask=mask, other=0.0)
    g = tl.load(grad + at, mask=mask, other=0.0) * grad_scale
    m = tl.load(moments + at, mask=mask, other=0.0)
    v = tl.load(moments + n + at, mask=mask, other=0.0)
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * (g * g)
    denominator = tl.sqrt_rn(v_new) * inv_bias2 + eps
    tl.store(out + at, p * keep - tl.div_rn(step * m_new, denominator), mask=mask)
    tl.store(out + n + at, m_new, mask=mask)
    tl.store(out + 2 * n + at, v_new, mask=mask)


@triton.jit
def adam_mini_update(theta, grad, moments, out, n, block, beta1, beta2, eps, keep, step,
                     inv_bias2, grad_scale, inv_block, BLOCK: tl.constexpr):
    """Adam-mini for one block of `block` elements sharing one second moment: the mean of its
    squared gradients first, then the elements in chunks of BLOCK."""
    n = n.to(tl.int64)
    b = tl.program_id(0).to(tl.int64)
    base = b * block
    cols = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, block, BLOCK):
        at = start + cols
        g = tl.load(grad + base + at, mask=at < block, other=0.0)
        total += tl.sum(g * g, 0)
    sum_sq = total * (grad_scale * grad_scale)
    v_new = beta2 * tl.load(moments + n + b) + (1.0 - beta2) * (sum_sq * inv_block)
    tl.store(out + 2 * n + b, v_new)
    rate = tl.div_rn(step, tl.sqrt_rn(v_new) * inv_bias2 + eps)
    for start in range(0, block, BLOCK):
        at = start + cols
        mask = at < block
        p = tl.load(theta + base + at, mask=mask, other=0.0)
        g = tl.load(grad + base + at, mask=mask, other=0.0)
        m = tl.load(moments + base + at, mask=mask, other=0.0)
        m_new = beta1 * m + (1.0 - beta1) * (g * grad_scale)
        tl.store(out + n + base + at, m_new, mask=mask)
        tl.store(out + base + at, p * keep - rate * m_new, mask=mask)


@triton.jit
def sum_squares_part(x, part, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """part[p] = sum of x^2 in f64 over program p's BLOCK * STEPS elements."""
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, STEPS):
        at = (program * STEPS + i) * BLOCK + cols
        v = tl.load(x + at, mask=at < n, other=0.0).to(tl.float64)
        acc += v * v
    tl.store(part + program, tl.sum(acc, 0))
