"""LLaMA's SwiGLU on the GPU as Triton kernels: the same op as the fused CPU kernel of
`swiglu.rs`, on the packed output of the one gate/up projection.

Layouts (contiguous, row-major; element strides):
  gu    rows x 2 inter: each row `[gate (inter) | up (inter)]`
  y     rows x inter: silu(gate) * up
  dy    rows x inter: the gradient of y
  d_gu  rows x 2 inter, like gu: `dy * up * s * (1 + gate * (1 - s))` then `dy * gate * s`,
        with s = sigmoid(gate)

Precision: bf16 or f32 operands, f32 arithmetic, each result rounded once to the operands' type.

Grid: (rows, cdiv(inter, BLOCK)). Block: 32 x num_warps threads (see `aot.py`).
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _load_gate_up(gu, inter, BLOCK: tl.constexpr):
    """This program's row base, columns, mask, and its gate and up values as f32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    base = gu + row * 2 * inter
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, g, u


@triton.jit
def swiglu_forward(gu, y, inter, BLOCK: tl.constexpr):
    """y = silu(gate) * up for one block of one row."""
    row, cols, mask, g, u = _load_gate_up(gu, inter, BLOCK)
    s = tl.sigmoid(g)
    tl.store(y + row * inter + cols, (g * s * u).to(y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward(gu, dy, d_gu, inter, BLOCK: tl.constexpr):
    """The gradient of the packed gate/up output for one block of one row."""
    row, cols, mask, g, u = _load_gate_up(gu, inter, BLOCK)
    d = tl.load(dy + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    out = d_gu + row * 2 * inter
    kind = d_gu.dtype.element_ty
    tl.store(out + cols, (d * u * s * (1.0 + g * (1.0 - s))).to(kind), mask=mask)
    tl.store(out + inter + cols, (d * g * s).to(kind), mask=mask)
