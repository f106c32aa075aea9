"""The token cross-entropy's two row passes on the GPU, as Triton kernels, for the chunked output
head of `cross_entropy_chunked.rs`: per chunk of rows a GEMM writes the logits, `row_logsumexp`
reads them once for each row's log-sum-exp, and `softmax_gradient` turns them in place into the
loss's gradient with respect to them. The logits of all rows are never whole.

Layouts (contiguous, row-major; element strides):
  logits    rows x vocab, bf16 or f32: read by `row_logsumexp`; overwritten by `softmax_gradient`
            with `scale * (softmax(row) - onehot(target))`, in the same type
  lse       rows, f32: log(sum(exp(row)))
  targets   rows, u32: each row's target id, below vocab

Precision: the logits are widened to f32; max, sum and exponentials are f32 (an online
log-sum-exp over blocks of `BLOCK_V` columns); the gradient is rounded once to the logits' type.

Grid: (rows,), one program per row, looping over the vocabulary in blocks of BLOCK_V (the last
one masked: any vocabulary size). Block: 32 x num_warps threads (see `aot.py`).
"""

import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def row_logsumexp(logits, lse, vocab, BLOCK_V: tl.constexpr):
    """lse[r] = log(sum_j exp(logits[r, j])), one row per program."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * vocab
    cols = tl.arange(0, BLOCK_V)
    top = -float("inf")
    total = 0.0
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        z = tl.load(base + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, 0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), 0)
        top = new_top
    tl.store(lse + row, top + tl.log(total))


@triton.jit
def softmax_gradient(logits, lse, targets, vocab, scale, BLOCK_V: tl.constexpr):
    """logits[r, j] <- scale * (exp(logits[r, j] - lse[r]) - [j == targets[r]]), in place."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * vocab
    cols = tl.arange(0, BLOCK_V)
    row_lse = tl.load(lse + row)
    target = tl.load(targets + row).to(tl.int64)
    for start in range(0, vocab, BLOCK_V):
        at = start + cols
        mask = at < vocab
        z = tl.load(base + at, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - row_lse)
        g = tl.where(at == target, p - 1.0, p) * scale
        tl.store(base + at, g.to(logits.dtype.element_ty), mask=mask)
