"""The optimizer on the GPU as multi-tensor Triton kernels: Adam's update of every parameter in one
launch (AdamW, and Adam-mini with one second moment per block of `block` consecutive elements, the
same op as the fused CPU kernel `AdamUpdate` of `src/optim/fused.rs` applies per parameter), in
place, and the gradient norm's sum of squares over every gradient in one launch.

    g  = grad * grad_scale
    m' = beta1 m + (1 - beta1) g
    v' = beta2 v + (1 - beta2) g^2              (Adam-mini: the mean of g^2 over the block)
    p' = p keep - step m' / (sqrt(v') inv_bias2 + eps)

with `keep = 1 - lr * weight_decay` for the parameters that decay and 1 for the others (the
per-tensor flag `decays`), `step = lr / (1 - beta1^t)`, `inv_bias2 = 1 / sqrt(1 - beta2^t)`
(PyTorch's AdamW), each rounded once to f32 by the launch code as the CPU op rounds them, and the
operations in the CPU op's order: AdamW divides per element, `p keep - (step m') / denominator`;
Adam-mini divides once per block, `p keep - (step / denominator) m'`, and sums the raw squares
before scaling them by `grad_scale^2`.

Layouts (contiguous; element offsets). `T` tensors, tensor `t` of `n_t` elements:
  pointers      3 T, int64 (the u64 device addresses of `triton::pointer_table`):
                `[theta (T) | grad (T) | moments (T)]` for the updates, `[grad (T)]` for the sum
  theta_t       n_t, f32, updated in place
  grad_t        n_t, f32
  moments_t     n_t + n_t / block_t, f32: `[m (n_t) | v (n_t / block_t)]`, updated in place
                (the checkpoint's layout, one tensor per parameter)
  sizes         T, int64: n_t
  blocks        T, int32: block_t (Adam-mini; AdamW's is 1)
  inv_blocks    T, f32: 1 / block_t rounded once to f32 (as the CPU op rounds it)
  decays        T, int32: 1 where weight decay applies to tensor t, else 0
  first         T, int32: the first program of tensor t
  owner         programs, int32: the tensor each program works on
  part          programs, f64: `sum_squares_multi`'s sum of x^2 per program (the launch code
                adds them in a fixed order: no atomics, deterministic)

A program finds its tensor in `owner`, a per-program table the launch code uploads once per set
of tensors (their shapes do not change between steps): one load, where a binary search over
`first` would be a chain of ~7 dependent loads before any useful one. It costs 4 bytes per
program, each program moving at least 4 KB (AdamW: 28 KB).

Precision: f32 throughout (parameters and moments are f32 in every run), the square root and the
divisions IEEE round-to-nearest (`sqrt_rn`, `div_rn`, not the approximate ones) and no fused
multiply-adds (`aot.py` compiles these kernels with fp fusion off): AdamW's per-element result is
the CPU op's f32 arithmetic, operation for operation; Adam-mini's block sum of squares is a tree
sum of f32 squares (the CPU's: eight lanes in order), so it differs from the CPU's in rounding
only. `sum_squares_multi` squares and sums in f64, as the CPU op does (an f32 square is exact in
f64).

Two update kernels, not one with a constexpr: their grids and their loops differ (AdamW one
program per BLOCK elements, no reduction; Adam-mini one program per block of any size, two passes
over it), as the CPU op's two loops do, and each has only the parameters it reads.

Grids: adamw_multi (sum over t of cdiv(n_t, BLOCK),); adam_mini_multi (sum over t of n_t /
block_t,), one program per block, looping over it in chunks of BLOCK (any block size);
sum_squares_multi (sum over t of cdiv(n_t, BLOCK * STEPS),). Block: 32 x num_warps threads (see
`aot.py`).
"""

import triton
import triton.language as tl

BLOCK = 1024
STEPS = 16


@triton.jit
def tensor_of(pointers, slot, tensors, t):
    """The f32 tensor `t` of the pointer table's slot `slot` (0 theta, 1 grad, 2 moments)."""
    return tl.load(pointers + slot * tensors + t).to(tl.pointer_type(tl.float32))


@triton.jit
def adamw_multi(pointers, tensors, owner, first, sizes, decays, beta1, beta2, eps, keep, step,
                inv_bias2, grad_scale, BLOCK: tl.constexpr):
    """AdamW (one second moment per element) for BLOCK elements of one tensor, in place."""
    program = tl.program_id(0)
    t = tl.load(owner + program)
    n = tl.load(sizes + t)
    theta = tensor_of(pointers, 0, tensors, t)
    grad = tensor_of(pointers, 1, tensors, t)
    moments = tensor_of(pointers, 2, tensors, t)
    kept = tl.where(tl.load(decays + t) != 0, keep, 1.0)
    at = (program - tl.load(first + t)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < n
    p = tl.load(theta + at, mask=mask, other=0.0)
    g = tl.load(grad + at, mask=mask, other=0.0) * grad_scale
    m = tl.load(moments + at, mask=mask, other=0.0)
    v = tl.load(moments + n + at, mask=mask, other=0.0)
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * (g * g)
    denominator = tl.sqrt_rn(v_new) * inv_bias2 + eps
    tl.store(theta + at, p * kept - tl.div_rn(step * m_new, denominator), mask=mask)
    tl.store(moments + at, m_new, mask=mask)
    tl.store(moments + n + at, v_new, mask=mask)


@triton.jit
def adam_mini_multi(pointers, tensors, owner, first, sizes, blocks, inv_blocks, decays, beta1,
                    beta2, eps, keep, step, inv_bias2, grad_scale, BLOCK: tl.constexpr):
    """Adam-mini for one block of one tensor, its elements sharing one second moment, in place:
    the mean of its squared gradients first, then the elements in chunks of BLOCK."""
    program = tl.program_id(0)
    t = tl.load(owner + program)
    n = tl.load(sizes + t)
    block = tl.load(blocks + t)
    theta = tensor_of(pointers, 0, tensors, t)
    grad = tensor_of(pointers, 1, tensors, t)
    moments = tensor_of(pointers, 2, tensors, t)
    kept = tl.where(tl.load(decays + t) != 0, keep, 1.0)
    b = (program - tl.load(first + t)).to(tl.int64)
    base = b * block
    cols = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, block, BLOCK):
        at = start + cols
        g = tl.load(grad + base + at, mask=at < block, other=0.0)
        total += tl.sum(g * g, 0)
    sum_sq = total * (grad_scale * grad_scale)
    v_new = beta2 * tl.load(moments + n + b) + (1.0 - beta2) * (sum_sq * tl.load(inv_blocks + t))
    tl.store(moments + n + b, v_new)
    rate = tl.div_rn(step, tl.sqrt_rn(v_new) * inv_bias2 + eps)
    for start in range(0, block, BLOCK):
        at = start + cols
        mask = at < block
        p = tl.load(theta + base + at, mask=mask, other=0.0)
        g = tl.load(grad + base + at, mask=mask, other=0.0)
        m = tl.load(moments + base + at, mask=mask, other=0.0)
        m_new = beta1 * m + (1.0 - beta1) * (g * grad_scale)
        tl.store(moments + base + at, m_new, mask=mask)
        tl.store(theta + base + at, p * kept - rate * m_new, mask=mask)


@triton.jit
def sum_squares_multi(pointers, owner, first, sizes, part, BLOCK: tl.constexpr,
                      STEPS: tl.constexpr):
    """part[p] = sum of x^2 in f64 over program p's BLOCK * STEPS elements of its tensor."""
    program = tl.program_id(0)
    t = tl.load(owner + program)
    n = tl.load(sizes + t)
    x = tensor_of(pointers, 0, 0, t)
    chunk = (program - tl.load(first + t)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, STEPS):
        at = (chunk * STEPS + i) * BLOCK + cols
        v = tl.load(x + at, mask=at < n, other=0.0).to(tl.float64)
        acc += v * v
    tl.store(part + program, tl.sum(acc, 0))
