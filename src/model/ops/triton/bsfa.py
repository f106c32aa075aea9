"""BSFA's per-step projection on the GPU as Triton kernels, over every block of a step in three
launches: the same arithmetic as the tensor ops of `src/optim/bsfa/projection.rs` (the path a GPU
took before, and the oracle of the self-check). For block b, a parameter tensor of n_b values
that the base step moved from `before` to `after`, with directions U (k_b x n_b, orthonormal
rows, k_b <= K):

    v      = after - before                       (the update, kept for the history)
    c      = scale * (U v)                        (k_b coordinates; scale = alpha - gamma)
    theta  = after + ((gamma - 1) v + U^T c)      (written over `after`, in place)

A block with no directions yet (k_b = 0) gets its update and is left as the base step made it.

Tables (one entry per block; `address` in `src/model/ops/triton.rs` gives the addresses):
  after, before, directions   int64 device addresses of f32 data: n_b, n_b, k_b x n_b (row-major;
                              unread when k_b = 0)
  numel, offset               int64: n_b, and where block b's update starts in `update`
  rank                        int32: k_b
  first                       int32, blocks + 1 entries: the first program of each block
                              (cdiv(n_b, CHUNK) programs each), then the total

Buffers (contiguous):
  update        sum of n_b, f32: the blocks' updates one after another
  parts         programs x K, f32: each program's partial coordinates (rows >= k_b are zero);
                `bsfa_coordinate_sum` adds a block's parts in program order: no atomics,
                deterministic
  coordinates   blocks x K, f32: c per block (rows >= k_b are zero)

Precision: f32 throughout, as the tensor path. The dot products are summed in a different order
than cuBLAS's (per COLS columns, then per program, then over programs), so the two agree to f32
rounding, not bit for bit.

Grids: bsfa_coordinates and bsfa_apply (programs,), one program per CHUNK values of one block,
found by a binary search of `first`; bsfa_coordinate_sum (blocks,). Block: 32 x num_warps
threads (see `aot.py`).
"""

import triton
import triton.language as tl

K = 64
CHUNK = 4096
COLS = 64
# Halvings of the binary search over `first`: enough for 2^SEARCH blocks.
SEARCH = 24


@triton.jit
def _block_of(first, blocks, program, SEARCH: tl.constexpr):
    """The block b with first[b] <= program < first[b + 1]."""
    lo = 0
    hi = blocks
    for _ in range(0, SEARCH):
        mid = (lo + hi) // 2
        below = tl.load(first + mid) <= program
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _address(table, b):
    """The f32 pointer at entry b of an address table."""
    return tl.load(table + b).to(tl.pointer_type(tl.float32))


@triton.jit
def bsfa_coordinates(after, before, directions, numel, offset, rank, first, update, parts,
                     blocks, K: tl.constexpr, CHUNK: tl.constexpr, COLS: tl.constexpr,
                     SEARCH: tl.constexpr):
    """The update of one program's CHUNK values, and their part of U v."""
    program = tl.program_id(0)
    b = _block_of(first, blocks, program, SEARCH)
    n = tl.load(numel + b)
    k = tl.load(rank + b)
    start = (program - tl.load(first + b)).to(tl.int64) * CHUNK
    a, p, u = _address(after, b), _address(before, b), _address(directions, b)
    out = update + tl.load(offset + b)
    rows = tl.arange(0, K).to(tl.int64)
    cols = tl.arange(0, COLS)
    acc = tl.zeros((K,), tl.float32)
    for s in range(0, CHUNK, COLS):
        at = start + s + cols
        mask = at < n
        v = tl.load(a + at, mask=mask, other=0.0) - tl.load(p + at, mask=mask, other=0.0)
        tl.store(out + at, v, mask=mask)
        tile = tl.load(u + rows[:, None] * n + at[None, :],
                       mask=(rows[:, None] < k) & mask[None, :], other=0.0)
        acc += tl.sum(tile * v[None, :], 1)
    tl.store(parts + program.to(tl.int64) * K + rows, acc)


@triton.jit
def bsfa_coordinate_sum(parts, first, coordinates, scale, K: tl.constexpr):
    """c = scale * the sum of block b's parts, in program order."""
    b = tl.program_id(0)
    rows = tl.arange(0, K)
    acc = tl.zeros((K,), tl.float32)
    start, end = tl.load(first + b), tl.load(first + b + 1)
    block_parts = parts + start.to(tl.int64) * K
    for i in range(0, end - start):
        acc += tl.load(block_parts + i * K + rows)
    tl.store(coordinates + b.to(tl.int64) * K + rows, acc * scale)


@triton.jit
def bsfa_apply(after, directions, numel, offset, rank, first, update, coordinates, blocks,
               gamma_minus_one, K: tl.constexpr, CHUNK: tl.constexpr, COLS: tl.constexpr,
               SEARCH: tl.constexpr):
    """theta = after + ((gamma - 1) v + U^T c) for one program's CHUNK values, in place;
    nothing for a block without directions."""
    program = tl.program_id(0)
    b = _block_of(first, blocks, program, SEARCH)
    n = tl.load(numel + b)
    k = tl.load(rank + b)
    start = (program - tl.load(first + b)).to(tl.int64) * CHUNK
    a, u = _address(after, b), _address(directions, b)
    v_at = update + tl.load(offset + b)
    # The values written: all of the block's, none without directions.
    written = tl.where(k > 0, n, 0)
    rows = tl.arange(0, K).to(tl.int64)
    c = tl.load(coordinates + b.to(tl.int64) * K + rows)
    cols = tl.arange(0, COLS)
    for s in range(0, CHUNK, COLS):
        at = start + s + cols
        mask = at < n
        tile = tl.load(u + rows[:, None] * n + at[None, :],
                       mask=(rows[:, None] < k) & mask[None, :], other=0.0)
        dominant = tl.sum(tile * c[:, None], 0)
        v = tl.load(v_at + at, mask=mask, other=0.0)
        theta = tl.load(a + at, mask=mask, other=0.0)
        tl.store(a + at, theta + (gamma_minus_one * v + dominant), mask=at < written)
