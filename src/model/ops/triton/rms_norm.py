"""RMSNorm on the GPU as Triton kernels: the same op as the fused CPU kernel of `rms_norm.rs`,
`y = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)` per row.

Also the residual stream's add fused in, forward (`add_rms_norm_forward`: `s = x + delta`, then `y`
from `s`) and backward (`rms_norm_dx_add`: `dx` plus the gradient already stored for `x`, the
residual's).

Layouts (contiguous, row-major; element strides):
  x, y, dy, dx   rows x n, bf16 or f32
  delta, s       rows x n, as x: the residual branch's output and the new residual stream
  residual       rows x n, as x: the gradient of x from the residual stream
  w              n, f32 (the model's norm weights stay f32 under bf16 compute)
  dw_part        cdiv(rows, ROWS) x n, f32: each program's sum over its rows of dy * x * r (the
                 launch code sums them in a fixed order: no atomics, deterministic)

Precision: bf16 or f32 rows, f32 weights, f32 arithmetic and sums, each row result rounded once
to the rows' type (dw_part stays f32, the weight's type).

Grids: the forwards and the dx kernels (rows,), one program per row, looping over the row in blocks of
BLOCK columns (any n); rms_norm_dw (cdiv(rows, ROWS), cdiv(n, BLOCK)), one program per ROWS rows
and BLOCK columns. Block:
32 x num_warps threads (see `aot.py`).
"""

import triton
import triton.language as tl

BLOCK = 1024
ROWS = 64


@triton.jit
def _inv_rms(base, n, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row at `base`, f32."""
    cols = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, n, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n, other=0.0).to(tl.float32)
        total += tl.sum(x * x, 0)
    return 1.0 / tl.sqrt(total / n + eps)


@triton.jit
def _scaled_row(x, w, y, row, n, r, BLOCK: tl.constexpr):
    """y = x * r * w for the row `row`."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        at = start + cols
        mask = at < n
        v = tl.load(x + row * n + at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(w + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(y + row * n + at, (v * r * g).to(y.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_forward(x, w, y, n, eps, BLOCK: tl.constexpr):
    """y = x * r * w for one row."""
    row = tl.program_id(0).to(tl.int64)
    r = _inv_rms(x + row * n, n, eps, BLOCK)
    _scaled_row(x, w, y, row, n, r, BLOCK)


@triton.jit
def add_rms_norm_forward(x, delta, w, s, y, n, eps, BLOCK: tl.constexpr):
    """s = x + delta (the residual stream, rounded to the rows' type) and y = s * r * w, r from
    the rounded s, for one row: the unfused add and norm's results, in one pass over x and
    delta (s read back from the cache)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, n, BLOCK):
        at = row * n + start + cols
        mask = start + cols < n
        v = (tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
             + tl.load(delta + at, mask=mask, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + at, v, mask=mask)
        wide = v.to(tl.float32)
        total += tl.sum(wide * wide, 0)
    r = 1.0 / tl.sqrt(total / n + eps)
    _scaled_row(s, w, y, row, n, r, BLOCK)


@triton.jit
def _dx_row(x, w, dy, residual, dx, n, eps, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
    """dx = r * w * dy - x * r^3 * sum(w * dy * x) / n for this program's row, plus the row of
    `residual` when RESIDUAL (the gradient already stored for x, added before the one rounding
    to the rows' type)."""
    row = tl.program_id(0).to(tl.int64)
    r = _inv_rms(x + row * n, n, eps, BLOCK)
    cols = tl.arange(0, BLOCK)
    dot = 0.0
    for start in range(0, n, BLOCK):
        at = start + cols
        mask = at < n
        v = tl.load(x + row * n + at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(w + at, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dy + row * n + at, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * d * v, 0)
    c = r * r * r * dot / n
    for start in range(0, n, BLOCK):
        at = start + cols
        mask = at < n
        v = tl.load(x + row * n + at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(w + at, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dy + row * n + at, mask=mask, other=0.0).to(tl.float32)
        out = r * g * d - v * c
        if RESIDUAL:
            out = tl.load(residual + row * n + at, mask=mask, other=0.0).to(tl.float32) + out
        tl.store(dx + row * n + at, out.to(dx.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_dx(x, w, dy, dx, n, eps, BLOCK: tl.constexpr):
    """dx = r * w * dy - x * r^3 * sum(w * dy * x) / n for one row."""
    _dx_row(x, w, dy, dx, dx, n, eps, BLOCK, False)


@triton.jit
def rms_norm_dx_add(x, w, dy, residual, dx, n, eps, BLOCK: tl.constexpr):
    """residual + rms_norm_dx's row: x's whole gradient where x also feeds the residual stream,
    without a separate add."""
    _dx_row(x, w, dy, residual, dx, n, eps, BLOCK, True)


@triton.jit
def rms_norm_dw(x, dy, dw_part, rows, n, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """dw_part[p, block] = sum over program p's ROWS rows, in row order, of dy * x * r, for
    one block of columns (each row's r is recomputed from the whole row)."""
    part = tl.program_id(0).to(tl.int64)
    at = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = at < n
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, ROWS):
        row = part * ROWS + i
        if row < rows:
            r = _inv_rms(x + row * n, n, eps, BLOCK)
            v = tl.load(x + row * n + at, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(dy + row * n + at, mask=mask, other=0.0).to(tl.float32)
            acc += d * v * r
    tl.store(dw_part + part * n + at, acc, mask=mask)
