"""Timing (host and device overlap between syncs) and the fused kernels: what each replaces
and what it costs per micro-batch or optimizer step."""
from collections import defaultdict

from math import ceil

from .hw import (BSFA_GROUPS, BSFA_K, BSFA_L, BSFA_T, C, EFF_BW, EIGEN, HBM, HOST_THREADS, I, L,
                 LAUNCH, MIN_KERNEL, N, PEAK_BF16, SYNC, prod)
from .optim import param_shapes


def phase_time(kernels):
    """GPU and host proceed in parallel between syncs: max(GPU busy, host enqueue) per segment."""
    total, gpu, host = 0.0, 0.0, 0.0
    for kn in kernels:
        gpu += kn.time
        host += kn.calls * LAUNCH
        if kn.kind == "sync":
            total += max(gpu, host)
            gpu = host = 0.0
    return total + max(gpu, host)


def summarize(kernels):
    out = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for kn in kernels:
        r = out[(kn.phase, kn.group)]
        r[0] += kn.flops
        r[1] += kn.bytes
        r[2] += kn.time
        r[3] += kn.calls
    return out


def fmt_ms(s):
    return f"{s * 1e3:.1f}"


# --- Fused kernels not written yet: what each replaces and what it costs per micro-batch -----
def t_bw(nbytes, eff=EFF_BW):
    return nbytes / (HBM * eff)


class Item:
    """A fused kernel (with its backward): the op groups it replaces, its GPU time and launches
    per micro-batch, and the gradients candle's autograd still zero-fills and adds for it."""

    def __init__(self, name, groups, gpu, calls, grad_bytes, grads):
        self.name, self.groups, self.gpu, self.calls = name, set(groups), gpu, calls
        self.grad_bytes, self.grads = grad_bytes, grads


def fused_items(micro):
    """The fused kernels still to write, over the CUDA path as it is now (`micro`: its
    kernels). Attention (with RoPE), the output head with the cross-entropy, the embedding's
    backward, RMSNorm and SwiGLU are written: cuda.py simulates them kernel by kernel; the
    residual add still to fuse into RMSNorm replaces both groups."""
    lin = [kn for kn in micro if kn.group == "linear GEMMs" and
           (kn.kind == "gemm" or (kn.phase == "fwd" and kn.kind == "cast"))]
    nc, ni = 2 * N * C, 2 * N * I                  # one bf16 activation of width C / I
    mat = 4 * sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in ("attn", "mlp"))
    return [
        # five linear layers per block (q, k, v packed in one): the GEMMs and the weight casts
        # stay, inside the op; the input and f32 weight gradients still pass through candle
        Item("linear as one op (cuBLAS fwd/bwd in a CustomOp, f32 weight, dW in f32)",
             ["linear GEMMs"], sum(kn.time for kn in lin), sum(kn.calls for kn in lin),
             L * (4 * nc + ni) + mat, L * 10),
    ]


def code_optimizer(block_mini):
    """The fused update as the code has it (src/optim/fused_cuda.rs): one multi-tensor Triton
    launch updates every parameter and its moments in place (AdamW 28 B per value, Adam-mini 24
    B: v per block, g read twice), after one upload of the tensors' addresses; the gradient
    norm is one multi-tensor sum-of-squares launch (4 B) after its own upload, candle's
    reduction of its parts and one host read for the clip scale. GPU time against the host's
    five launches, whichever binds."""
    n = sum(prod(sh) for _, sh, _, _ in param_shapes())
    per = 24 if block_mini else 28
    gpu = t_bw(per * n) + t_bw(4 * n) + 3 * MIN_KERNEL
    launches = 5
    return max(gpu, launches * LAUNCH) + SYNC


def fused_bsfa(bits):
    n = sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in BSFA_GROUPS)
    k, m = BSFA_K, BSFA_L
    rb = 4 if bits == 32 else 0.5 + 2 / 64 + 4 / n   # bytes per stored value
    # U v and U^T c for every block in two batched launches (U read twice); the update written
    # to the history row by the Adam kernel and theta updated in place (16 B per value)
    step = t_bw(2 * rb * k * n + 16 * n) + 4 * MIN_KERNEL
    # the Gram products of the T rows written since the last re-estimation, directions
    # (C P) H, overlap U_old U_new^T: history read twice, U written once and read twice; the
    # eigenproblems on the host's threads with one sync each way
    blocks = sum(1 for _, _, grp, _ in param_shapes() if grp in BSFA_GROUPS)
    refresh = (t_bw(rb * (BSFA_T + 2 * m) * n + 3 * rb * k * n)
               + 2.0 * (BSFA_T + k) * m * n / (PEAK_BF16 * 0.3)
               + ceil(blocks / HOST_THREADS) * EIGEN + 2 * SYNC)
    return step, refresh
