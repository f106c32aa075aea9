#!/usr/bin/env python3
"""Performance model on paper of the CUDA path: llama134m, seq 1024, micro-batch 12, bf16 compute
with f32 master weights, on one H100 SXM. A model, not a measurement (no GPU was lent).

It replays what the CUDA build executes: the forward pass of `Llama::loss` through the
`reference` ops of src/model/ops (candle primitives), then candle 0.11.1's `Tensor::backward`
(backprop.rs) node by node with its rules (every gradient contribution is a zero-filled tensor
plus an `add`, untracked broadcast operands still get a full-size gradient that stays in the store,
...), then clipping and the optimizer's tensor-op paths (src/optim/adam.rs, src/optim/bsfa/). Each
kernel gets FLOPs, bytes read + written (in the dtype the code stores) and a time at the roofline
max(FLOPs / (peak x eff), bytes / (bandwidth x eff)); each launch costs host time. Live device
memory is tracked through the forward graph and the gradient store for the peak.

Then the fused kernels of docs/gpu.md are applied one by one, largest saving first.

    python3 scripts/gpu_perf_model.py            # the tables of docs/gpu.md
    python3 scripts/gpu_perf_model.py --kernels  # also every kernel class per op group

Plain Python 3, no packages.
"""
import argparse
import sys
from collections import defaultdict

sys.setrecursionlimit(100000)

# --- Hardware: NVIDIA H100 SXM5 datasheet -------------------------------------------------
PEAK_BF16 = 989e12      # dense BF16 tensor-core FLOP/s (1,979 with sparsity)
PEAK_FP32 = 67e12       # FP32 FLOP/s without tensor cores (candle leaves TF32 off)
HBM = 3.35e12           # HBM3 bytes/s
PCIE = 20e9             # pageable host<->device copies (assumption; Gen5 x16 peak is 64 GB/s)

# --- Efficiencies (assumptions, see docs/gpu.md) ------------------------------------------
EFF_GEMM = 0.65         # large bf16 GEMMs, fraction of peak FLOP/s
EFF_GEMM_F32 = 0.5      # f32 GEMMs (BSFA's Gram and direction products), fraction of 67 TFLOP/s
EFF_BW = 0.75           # contiguous elementwise kernels, reductions over the last dimension
EFF_STRIDED = 0.4       # elementwise kernels reading a transposed / narrowed / broadcast view
EFF_RED_STRIDED = 0.25  # reductions over leading dimensions (one block per output column)
EFF_MEMSET = 0.85       # cudaMemsetAsync (zero-filled gradients)
MIN_KERNEL = 2e-6       # shortest kernel on the GPU timeline
LAUNCH = 5e-6           # host time per kernel launch / memset / small copy (candle + driver)
SYNC = 10e-6            # one host <-> device round trip (to_scalar)
INDEX_ADD_ITER = 0.5e-6 # candle's index_add: one thread per column, a dependent loop over tokens
EIGEN = 255e-6          # nalgebra symmetric_eigen of a 60 x 60 Gram matrix (measured, docs/bsfa.md)
MASK_HOST = 1.5e-3      # causal_mask: 1M f32 built on one core, per layer and micro-batch

# --- Model: configs/llama134m.json ----------------------------------------------------------
B, T, C, H, KV, I, V, L = 12, 1024, 768, 16, 16, 3072, 50304, 6
HD = C // H
N = B * T
MICRO_PER_STEP = 480 // 12   # train.batch_size / train.micro_batch_size of the preset
BSFA_K, BSFA_L, BSFA_T = 50, 60, 10

DB = {"f32": 4, "bf16": 2, "u32": 4, "f64": 8}
GIB = 2**30


def prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


# ============================================================================================
# Kernels and device memory
# ============================================================================================
class Kernel:
    __slots__ = ("phase", "group", "kind", "flops", "bytes", "time", "calls", "first")


class Sim:
    def __init__(self):
        self.kernels = []
        self.phase = "fwd"
        self.group = "misc"
        self.live = 0
        self.peak = 0
        self.kept = defaultdict(int)    # bytes allocated in the forward, per op group

    def alloc(self, nbytes):
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live

    def free(self, nbytes):
        self.live -= nbytes

    def k(self, kind, flops=0.0, nbytes=0.0, eff=EFF_BW, peak=PEAK_BF16, calls=1, gpu=None):
        """One kernel (or API call): its GPU time at the roofline, `calls` host launches."""
        kn = Kernel()
        kn.phase, kn.group, kn.kind = self.phase, self.group, kind
        kn.flops, kn.bytes, kn.calls = flops, nbytes, calls
        kn.first = False  # True: zero-fill or add of a first gradient; "copy": strided such add
        if gpu is not None:
            kn.time = gpu
        else:
            t_c = flops / (peak * (EFF_GEMM if peak == PEAK_BF16 else EFF_GEMM_F32)) if flops else 0
            t_m = nbytes / (HBM * eff)
            kn.time = max(t_c, t_m, MIN_KERNEL * calls)
        self.kernels.append(kn)
        return kn


S = Sim()


class Storage:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes):
        self.nbytes = nbytes


class Tensor:
    _next = 0

    def __init__(self, shape, dtype, op=None, args=(), var=False, storage=None, contig=True,
                 bcast_src=None, meta=None):
        Tensor._next += 1
        self.id = Tensor._next
        self.shape, self.dtype = tuple(shape), dtype
        self.op, self.args, self.var, self.meta = op, tuple(args), var, meta
        self.numel = prod(self.shape)
        self.nbytes = self.numel * DB[dtype]
        self.contig = contig
        self.bcast_src = bcast_src  # bytes actually behind a broadcast view
        if storage is None:
            storage = Storage(self.nbytes)
            S.alloc(storage.nbytes)
            S.kept[S.group] += storage.nbytes
        self.storage = storage
        self.group = S.group

    @property
    def tracked(self):
        return self.var or self.op is not None

    def read_bytes(self):
        return self.bcast_src if self.bcast_src is not None else self.nbytes


def rec(op, *args):
    """candle's BackpropOp::new: the op is recorded only when an argument is tracked."""
    return op if any(a.tracked for a in args if isinstance(a, Tensor)) else None


def layout_eff(*ts):
    """Efficiency and extra H2D layout upload of an elementwise kernel over these inputs."""
    strided = [t for t in ts if not t.contig]
    if not strided:
        return EFF_BW, 0
    # candle uploads dims + strides (a small H2D copy) before a strided launch
    S.k("h2d-layout", gpu=MIN_KERNEL)
    bcast_only = all(t.bcast_src is not None for t in strided)
    return (EFF_BW if bcast_only else EFF_STRIDED), 1


# --- forward primitives, as candle-core 0.11.1 implements them ------------------------------
def var(shape, dtype="f32"):
    return Tensor(shape, dtype, var=True)


def view(x, shape, op, contig=None, bcast_src=None):
    return Tensor(shape, x.dtype, op=rec(op, x), args=(x,), storage=x.storage,
                  contig=x.contig if contig is None else contig, bcast_src=bcast_src)


def reshape(x, shape):
    if x.contig:
        return view(x, shape, "reshape", contig=True)
    eff, _ = layout_eff(x)
    out = Tensor(shape, x.dtype, op=rec("reshape", x), args=(x,))
    S.k("copy", nbytes=x.nbytes + out.nbytes, eff=eff)
    return out


def transpose(x, d1, d2):
    shape = list(x.shape)
    shape[d1], shape[d2] = shape[d2], shape[d1]
    return view(x, shape, "transpose", contig=False)


def narrow(x, dim, start, length):
    shape = list(x.shape)
    shape[dim] = length
    return view(x, shape, "narrow", contig=(dim == 0 or length == x.shape[dim]))


def broadcast_as(x, shape):
    return view(x, shape, "broadcast", contig=False, bcast_src=x.nbytes)


def contiguous(x):
    if x.contig:
        return x
    eff, _ = layout_eff(x)
    out = Tensor(x.shape, x.dtype, op=rec("copy", x), args=(x,))
    S.k("copy", nbytes=x.read_bytes() + out.nbytes, eff=eff)
    return out


def to_dtype(x, dtype):
    if x.dtype == dtype:
        return x
    eff, _ = layout_eff(x)
    out = Tensor(x.shape, dtype, op=rec("to_dtype", x), args=(x,))
    S.k("cast", nbytes=x.read_bytes() + out.nbytes, eff=eff)
    return out


def unary(x, name):
    eff, _ = layout_eff(x)
    out = Tensor(x.shape, x.dtype, op=rec(name, x), args=(x,))
    S.k(name, nbytes=x.read_bytes() + out.nbytes, eff=eff)
    return out


def affine(x, mul=1.0, add=0.0):
    eff, _ = layout_eff(x)
    out = Tensor(x.shape, x.dtype, op=rec("affine", x), args=(x,), meta=mul)
    S.k("affine", nbytes=x.read_bytes() + out.nbytes, eff=eff)
    return out


def binary(a, b, name):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    eff, _ = layout_eff(a, b)
    out = Tensor(a.shape, a.dtype, op=rec(name, a, b), args=(a, b))
    S.k(name, nbytes=a.read_bytes() + b.read_bytes() + out.nbytes, eff=eff)
    return out


def broadcast_shape(a, b):
    ra, rb = list(a.shape), list(b.shape)
    n = max(len(ra), len(rb))
    ra, rb = [1] * (n - len(ra)) + ra, [1] * (n - len(rb)) + rb
    return tuple(max(x, y) for x, y in zip(ra, rb))


def bbinary(a, b, name):
    shape = broadcast_shape(a, b)
    a2 = a if a.shape == shape else broadcast_as(a, shape)
    b2 = b if b.shape == shape else broadcast_as(b, shape)
    return binary(a2, b2, name)


def reduce(x, dims, keepdim, name):
    out_shape = [1 if i in dims else d for i, d in enumerate(x.shape)]
    last = all(d >= len(x.shape) - len(dims) for d in dims)
    S.k("h2d-layout", gpu=MIN_KERNEL)  # FastReduce always uploads dims + strides
    out = Tensor(out_shape, x.dtype, op=rec(name, x), args=(x,), meta=dims)
    S.k("reduce-" + name, nbytes=x.read_bytes() + out.nbytes,
        eff=EFF_BW if last and x.contig else EFF_RED_STRIDED)
    if not keepdim:
        out = reshape(out, [d for i, d in enumerate(x.shape) if i not in dims])
    return out


def detach(x):
    return Tensor(x.shape, x.dtype, storage=x.storage, contig=x.contig)


def matmul(a, b):
    *batch, m, k = a.shape
    n = b.shape[-1]
    out = Tensor(tuple(batch) + (m, n), a.dtype, op=rec("matmul", a, b), args=(a, b))
    bsz = prod(batch)
    S.k("gemm", flops=2.0 * bsz * m * n * k, nbytes=a.nbytes + b.nbytes + out.nbytes,
        peak=PEAK_BF16 if a.dtype == "bf16" else PEAK_FP32)
    return out


def index_select(w, ids_len):
    out = Tensor((ids_len, w.shape[1]), w.dtype, op=rec("index_select", w), args=(w,))
    S.k("index_select", nbytes=2 * out.nbytes + ids_len * 4)
    return out


def gather(x, n):
    out = Tensor((n, 1), x.dtype, op=rec("gather", x), args=(x,))
    S.k("gather", nbytes=n * 4 * 3)
    return out


def cat(parts, dim):
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = Tensor(shape, parts[0].dtype, op=rec("cat", *parts), args=tuple(parts), meta=dim)
    for p in parts:
        S.k("copy2d", nbytes=2 * p.nbytes, eff=EFF_BW if p.contig else EFF_STRIDED)
    return out


def const(shape, dtype):
    """An untracked tensor built on the host (the causal mask): H2D of f32 data, then a cast."""
    t = Tensor(shape, "f32")
    S.k("h2d-data", gpu=t.nbytes / PCIE)
    return to_dtype(t, dtype)


# ============================================================================================
# The forward pass of Llama::loss on CUDA in bf16 (reference ops)
# ============================================================================================
def linear(x, w):
    """ops::linear::reference::linear: reshape, w.t(), matmul, reshape."""
    rows = prod(x.shape[:-1])
    S.group, prev = "linear GEMMs", S.group
    out = matmul(reshape(x, (rows, x.shape[-1])), transpose(w, 0, 1))
    out = reshape(out, x.shape[:-1] + (w.shape[0],))
    S.group = prev
    return out


def cast_weight(w, group="linear GEMMs"):
    S.group, prev = group, S.group
    out = to_dtype(w, "bf16")
    S.group = prev
    return out


def rms_norm(x, w):
    """Llama::norm: to f32, ops::rms_norm::reference, back to bf16."""
    S.group = "RMSNorm"
    xf = to_dtype(x, "f32")
    ms = affine(reduce(unary(xf, "sqr"), [len(xf.shape) - 1], True, "sum"), 1.0 / C)
    inv = unary(unary(affine(ms, 1.0, 1e-5), "sqrt"), "recip")
    y = bbinary(bbinary(xf, inv, "mul"), w, "mul")
    return to_dtype(y, "bf16")


def rope(x, cos, sin):
    """ops::rope::reference::rope."""
    S.group = "RoPE"
    b, t, width = x.shape
    x4 = reshape(x, (b, t, width // HD, HD))
    x1 = narrow(x4, 3, 0, HD // 2)
    x2 = narrow(x4, 3, HD // 2, HD // 2)
    rotated = cat([unary(x2, "neg"), x1], 3)
    cu, su = view(cos, (T, 1, HD), "reshape"), view(sin, (T, 1, HD), "reshape")
    y = binary(bbinary(x4, cu, "mul"), bbinary(rotated, su, "mul"), "add")
    return reshape(y, (b, t, width))


def attention(x, wq, wk, wv, wo, cos, sin):
    q, k, v = linear(x, wq), linear(x, wk), linear(x, wv)
    q = rope(q, cos, sin)
    S.group = "attention (scores, softmax, heads)"
    q = affine(q, 1.0 / HD ** 0.5)

    def split(t, n):
        return contiguous(transpose(reshape(t, (B, T, n, HD)), 1, 2))

    q = split(q, H)
    k = rope(k, cos, sin)
    S.group = "attention (scores, softmax, heads)"
    k = split(k, KV)            # repeat_kv is the identity at kv_heads == heads
    v = split(v, KV)
    mask = const((T, T), "bf16")
    scores = bbinary(matmul(q, transpose(k, 2, 3)), mask, "add")
    wide = to_dtype(scores, "f32")
    mx = detach(reduce(wide, [3], True, "max"))
    ex = unary(bbinary(wide, mx, "sub"), "exp")
    probs = to_dtype(bbinary(ex, reduce(ex, [3], True, "sum"), "div"), "bf16")
    out = reshape(transpose(matmul(probs, v), 1, 2), (B, T, C))
    return linear(out, wo)


def forward(weights):
    S.phase = "fwd"
    S.group = "embedding"
    x = to_dtype(reshape(index_select(weights["embed"], N), (B, T, C)), "bf16")
    S.group = "RoPE"
    cos = to_dtype(Tensor((T, HD), "f32"), "bf16")
    sin = to_dtype(Tensor((T, HD), "f32"), "bf16")
    for layer in weights["layers"]:
        c = {n: cast_weight(w) for n, w in layer.items() if not n.startswith("norm")}
        h = rms_norm(x, layer["norm1"])
        a = attention(h, c["q"], c["k"], c["v"], c["o"], cos, sin)
        S.group = "residual adds"
        x = binary(x, a, "add")
        h = rms_norm(x, layer["norm2"])
        S.group = "SwiGLU (silu, product)"
        g = linear(h, c["gate"])
        u = linear(h, c["up"])
        S.group = "SwiGLU (silu, product)"
        m = linear(binary(unary(g, "silu"), u, "mul"), c["down"])
        S.group = "residual adds"
        x = binary(x, m, "add")
    h = rms_norm(x, weights["norm"])
    # Llama::loss: linear_cross_entropy -> reference linear + widened cross_entropy
    S.group = "output head + cross-entropy"
    hidden = reshape(h, (N, C))
    logits = reshape(matmul(reshape(hidden, (N, C)),
                            transpose(cast_weight(weights["head"], S.group), 0, 1)), (N, V))
    S.group = "output head + cross-entropy"
    lf = to_dtype(logits, "f32")
    mx = detach(reduce(lf, [1], True, "max"))
    shifted = bbinary(lf, mx, "sub")
    lse = unary(reduce(unary(shifted, "exp"), [1], True, "sum"), "log")
    loss = reduce(binary(lse, gather(shifted, N), "sub"), [0, 1], False, "sum")
    loss = affine(loss, 1.0 / N)
    # train/step.rs: loss.to_dtype(F64).to_scalar() (a sync), then (loss * weight).backward()
    S.k("cast", nbytes=12)
    S.k("sync", gpu=SYNC)
    return affine(loss, 1.0)


# ============================================================================================
# candle-core 0.11.1 backprop.rs, replayed
# ============================================================================================
class Grad:
    """A gradient tensor (always materialised: zeros + add make it contiguous)."""

    def __init__(self, shape, dtype, contig=True, bcast_src=None, owned=True):
        self.shape, self.dtype = tuple(shape), dtype
        self.numel = prod(self.shape)
        self.nbytes = self.numel * DB[dtype]
        self.contig, self.bcast_src, self.owned = contig, bcast_src, owned
        if owned:
            S.alloc(self.nbytes)

    def read_bytes(self):
        return self.bcast_src if self.bcast_src is not None else self.nbytes

    def view(self, shape=None, contig=None, bcast_src=None):
        return Grad(shape or self.shape, self.dtype, self.contig if contig is None else contig,
                    bcast_src, owned=False)


def sorted_nodes(root):
    seen, nodes = {}, []

    def walk(node):
        if node.id in seen:
            return seen[node.id]
        tg = False
        if node.var:
            tg = True
        elif node.dtype == "u32":
            tg = False
        elif node.op is not None:
            for a in node.args:
                tg |= walk(a)
        seen[node.id] = tg
        if tg:
            nodes.append(node)
        return tg

    walk(root)
    return list(reversed(nodes))


def g_elementwise(name, ins, out_shape, out_dtype):
    """A backward kernel producing a fresh (temporary) gradient."""
    eff = EFF_BW
    if any(not g.contig for g in ins):
        S.k("h2d-layout", gpu=MIN_KERNEL)
        eff = EFF_BW if all(g.bcast_src is not None or g.contig for g in ins) else EFF_STRIDED
    out = Grad(out_shape, out_dtype)
    S.k(name, nbytes=sum(g.read_bytes() for g in ins) + out.nbytes, eff=eff)
    return out


def backward(root):
    S.phase = "bwd"
    store = {}
    order = sorted_nodes(root)
    S.group = "output head + cross-entropy"
    seed = Grad(root.shape, root.dtype)
    S.k("fill", nbytes=seed.nbytes)
    store[root.id] = seed
    orphans = set()
    tracked_ids = {n.id for n in order}

    def accumulate(target, g, sub=False):
        """grads.or_insert(target) (zeros_like: memset) then add/sub: a new contiguous tensor."""
        old = store.get(target.id)
        first = old is None
        if first:
            old = Grad(target.shape, target.dtype)
            S.k("memset", nbytes=old.nbytes, eff=EFF_MEMSET).first = True
            if not target.tracked or (target.id not in tracked_ids and not target.var):
                orphans.add(target.id)
        new = g_elementwise("sub" if sub else "add", [old, g], target.shape, target.dtype)
        if first:
            # moved in instead, a first gradient would still need a copy if strided (matmul
            # wants its layouts) and a negation if subtracted
            S.kernels[-1].first = "copy" if (sub or not g.contig) else True
        S.free(old.nbytes)
        store[target.id] = new

    def temp_done(*gs):
        for g in gs:
            if g.owned:
                S.free(g.nbytes)

    for node in order:
        if node.var:
            continue
        grad = store.pop(node.id)
        S.group = node.group
        op, args = node.op, node.args
        if op == "add":
            accumulate(args[0], grad)
            accumulate(args[1], grad)
        elif op == "sub":
            accumulate(args[0], grad)
            accumulate(args[1], grad, sub=True)
        elif op == "mul":
            lhs, rhs = args
            t = g_elementwise("mul", [grad, Grad.view(grad, bcast_src=rhs.read_bytes(),
                                                      contig=rhs.contig)], lhs.shape, lhs.dtype)
            accumulate(lhs, t)
            temp_done(t)
            t = g_elementwise("mul", [grad, Grad.view(grad, bcast_src=lhs.read_bytes(),
                                                      contig=lhs.contig)], rhs.shape, rhs.dtype)
            accumulate(rhs, t)
            temp_done(t)
        elif op == "div":
            lhs, rhs = args
            r = Grad.view(grad, bcast_src=rhs.read_bytes(), contig=rhs.contig)
            t = g_elementwise("div", [grad, r], lhs.shape, lhs.dtype)
            accumulate(lhs, t)
            temp_done(t)
            t1 = g_elementwise("mul", [grad, Grad.view(grad)], lhs.shape, lhs.dtype)
            sq = g_elementwise("sqr", [r], rhs.shape, rhs.dtype)  # rhs.sqr() of a broadcast view
            t2 = g_elementwise("div", [t1, sq], rhs.shape, rhs.dtype)
            temp_done(t1, sq)
            accumulate(rhs, t2, sub=True)
            temp_done(t2)
        elif op == "matmul":
            lhs, rhs = args
            *batch, m, k = lhs.shape
            n = rhs.shape[-1]
            bsz = prod(batch)
            peak = PEAK_BF16 if lhs.dtype == "bf16" else PEAK_FP32
            t = Grad(lhs.shape, lhs.dtype)
            S.k("gemm", flops=2.0 * bsz * m * n * k,
                nbytes=grad.nbytes + rhs.nbytes + t.nbytes, peak=peak)
            accumulate(lhs, t)
            temp_done(t)
            t = Grad(rhs.shape, rhs.dtype)
            S.k("gemm", flops=2.0 * bsz * m * n * k,
                nbytes=grad.nbytes + lhs.nbytes + t.nbytes, peak=peak)
            accumulate(rhs, t)
            temp_done(t)
        elif op == "broadcast":
            (arg,) = args
            t = Grad(arg.shape, arg.dtype)
            lead = len(node.shape) - len(arg.shape)
            dims = list(range(lead)) + [i + lead for i, (a, b) in
                                        enumerate(zip(arg.shape, node.shape[lead:])) if a != b]
            last = all(d >= len(node.shape) - len(dims) for d in dims)
            S.k("h2d-layout", gpu=MIN_KERNEL)
            S.k("reduce-sum", nbytes=grad.nbytes + t.nbytes,
                eff=EFF_BW if last else EFF_RED_STRIDED)
            accumulate(arg, t)
            temp_done(t)
        elif op == "sum":
            (arg,) = args
            accumulate(arg, Grad.view(grad, shape=arg.shape, contig=False,
                                      bcast_src=grad.nbytes))
        elif op == "to_dtype":
            (arg,) = args
            t = g_elementwise("cast", [grad], arg.shape, arg.dtype)
            accumulate(arg, t)
            temp_done(t)
        elif op in ("copy", "reshape"):
            (arg,) = args
            accumulate(arg, Grad.view(grad, shape=arg.shape))
        elif op == "transpose":
            (arg,) = args
            accumulate(arg, Grad.view(grad, shape=arg.shape, contig=False))
        elif op == "affine":
            (arg,) = args
            t = g_elementwise("affine", [grad], arg.shape, arg.dtype)
            accumulate(arg, t)
            temp_done(t)
        elif op == "exp":
            (arg,) = args
            t = g_elementwise("mul", [grad, Grad.view(grad)], arg.shape, arg.dtype)
            accumulate(arg, t)
            temp_done(t)
        elif op == "log":
            (arg,) = args
            t = g_elementwise("div", [grad, Grad.view(grad)], arg.shape, arg.dtype)
            accumulate(arg, t)
            temp_done(t)
        elif op == "sqr":
            (arg,) = args
            t1 = g_elementwise("mul", [grad, Grad.view(grad)], arg.shape, arg.dtype)
            t2 = g_elementwise("affine", [t1], arg.shape, arg.dtype)
            temp_done(t1)
            accumulate(arg, t2)
            temp_done(t2)
        elif op == "sqrt":
            (arg,) = args
            t1 = g_elementwise("div", [grad, Grad.view(grad)], arg.shape, arg.dtype)
            t2 = g_elementwise("affine", [t1], arg.shape, arg.dtype)
            temp_done(t1)
            accumulate(arg, t2)
            temp_done(t2)
        elif op == "recip":
            (arg,) = args
            sq = g_elementwise("sqr", [Grad.view(grad)], arg.shape, arg.dtype)
            t = g_elementwise("div", [grad, sq], arg.shape, arg.dtype)
            temp_done(sq)
            accumulate(arg, t, sub=True)
            temp_done(t)
        elif op == "neg":
            (arg,) = args
            accumulate(arg, grad, sub=True)
        elif op == "silu":
            (arg,) = args
            shp, dt = arg.shape, arg.dtype
            a = g_elementwise("neg", [Grad.view(grad)], shp, dt)
            b = g_elementwise("exp", [a], shp, dt)
            c = g_elementwise("affine", [b], shp, dt)
            d = g_elementwise("recip", [c], shp, dt)
            temp_done(a, b, c)
            e = g_elementwise("affine", [Grad.view(grad)], shp, dt)     # 1 - node
            f = g_elementwise("mul", [d, e], shp, dt)
            g = g_elementwise("add", [f, Grad.view(grad)], shp, dt)    # + node
            temp_done(d, e, f)
            t = g_elementwise("mul", [grad, g], shp, dt)
            temp_done(g)
            accumulate(arg, t)
            temp_done(t)
        elif op == "narrow":
            (arg,) = args
            pad = Grad(arg.shape[:-1] + (arg.shape[-1] - node.shape[-1],), arg.dtype)
            S.k("memset", nbytes=pad.nbytes, eff=EFF_MEMSET)
            full = Grad(arg.shape, arg.dtype)
            S.k("copy2d", nbytes=2 * pad.nbytes, calls=1)
            S.k("copy2d", nbytes=2 * grad.nbytes, calls=1)
            temp_done(pad)
            accumulate(arg, full)
            temp_done(full)
        elif op == "cat":
            for a in args:
                accumulate(a, Grad.view(grad, shape=a.shape, contig=False))
        elif op == "index_select":
            (arg,) = args
            # zeros (V x C f32), index_add: a copy of them, then the kernel
            old = store.get(arg.id)
            if old is None:
                old = Grad(arg.shape, arg.dtype)
                S.k("memset", nbytes=old.nbytes, eff=EFF_MEMSET)
            new = Grad(arg.shape, arg.dtype)
            S.k("copy", nbytes=2 * new.nbytes)
            S.k("index_add", nbytes=grad.nbytes * 3, gpu=N * INDEX_ADD_ITER)
            S.free(old.nbytes)
            store[arg.id] = new
        elif op == "gather":
            (arg,) = args
            old = store.get(arg.id)
            if old is None:
                old = Grad(arg.shape, arg.dtype)
                S.k("memset", nbytes=old.nbytes, eff=EFF_MEMSET)
            new = Grad(arg.shape, arg.dtype)
            S.k("copy", nbytes=2 * new.nbytes)   # scatter_add copies its destination first
            S.k("scatter_add", nbytes=grad.nbytes * 3)
            S.free(old.nbytes)
            store[arg.id] = new
        else:
            raise ValueError(op)
        temp_done(grad)
    orphan_bytes = sum(store[i].nbytes for i in orphans if i in store)
    var_grad_bytes = sum(g.nbytes for i, g in store.items() if i not in orphans)
    return store, orphan_bytes, var_grad_bytes


# ============================================================================================
# Clipping and the optimizers (tensor-op paths: any non-CPU tensor)
# ============================================================================================
def param_shapes():
    shapes = [("embed", (V, C), "embed", C)]
    for _ in range(L):
        shapes += [("norm", (C,), "norm", C), ("q", (C, C), "attn", C * C // H),
                   ("k", (KV * HD, C), "attn", C * C // H), ("v", (KV * HD, C), "attn", C),
                   ("o", (C, C), "attn", C), ("norm", (C,), "norm", C),
                   ("gate", (I, C), "mlp", C), ("up", (I, C), "mlp", C),
                   ("down", (C, I), "mlp", I)]
    shapes += [("norm", (C,), "norm", C), ("head", (V, C), "head", C)]
    return shapes


def grad_accumulate():
    """step.rs: acc + g per parameter, from the second micro-batch on."""
    S.phase, S.group = "opt", "gradient accumulation"
    for _, shape, _, _ in param_shapes():
        n = prod(shape)
        S.k("add", nbytes=12 * n)


def clip():
    """optim::global_norm on a device tensor: sqr, sum_all, to f64, to_scalar (a sync) each."""
    S.phase, S.group = "opt", "clip (grad norm)"
    for _, shape, _, _ in param_shapes():
        n = prod(shape)
        S.k("sqr", nbytes=8 * n)
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("reduce-sum", nbytes=4 * n + 4, eff=EFF_BW)
        S.k("cast", nbytes=12)
        S.k("sync", gpu=SYNC)


def adam(block_of):
    """Adam::update_with_tensor_ops, once per parameter, then Var::set (a copy)."""
    S.phase, S.group = "opt", "optimizer (Adam tensor ops)"
    for name, shape, _, mini_block in param_shapes():
        n = prod(shape)
        blk = block_of(name, shape, mini_block)
        nb = n // blk
        f = 4
        S.k("affine", nbytes=2 * f * n)                     # grad * scale
        S.k("affine", nbytes=2 * f * n)                     # m * beta1
        S.k("affine", nbytes=2 * f * n)                     # grad * (1 - beta1)
        S.k("add", nbytes=3 * f * n)                        # m
        S.k("sqr", nbytes=2 * f * n)                        # grad^2
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("reduce-sum", nbytes=f * (n + nb))              # mean over the block
        S.k("affine", nbytes=2 * f * nb)
        S.k("affine", nbytes=2 * f * nb)                    # v * beta2
        S.k("affine", nbytes=2 * f * nb)                    # mean_sq * (1 - beta2)
        S.k("add", nbytes=3 * f * nb)                       # v
        S.k("sqrt", nbytes=2 * f * nb)
        S.k("affine", nbytes=2 * f * nb)                    # / bias2_sqrt
        S.k("affine", nbytes=2 * f * nb)                    # + eps
        if blk > 1:
            S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("div", nbytes=f * (2 * n + nb))                 # m / denom (broadcast)
        S.k("affine", nbytes=2 * f * n)                     # theta * (1 - decay)
        S.k("affine", nbytes=2 * f * n)                     # update * lr / bias1
        S.k("sub", nbytes=3 * f * n)
        S.k("copy2d", nbytes=2 * f * n)                     # cat([m, v])
        S.k("copy2d", nbytes=2 * f * nb)
        S.k("copy", nbytes=2 * f * n)                       # Var::set


def dequantize4(rows, n):
    """Quant4Tensors::dequantize of rows x n on the device: about 15 launches; per value, the
    u8 -> f32 widening, nibble split, interleave, padding, scale and zero-point passes move
    about 46 bytes."""
    S.k("dequantize4", nbytes=46 * rows * n, calls=15)


def quantize4(rows, n):
    """Quant4Tensors::quantize of rows x n on the device: about 70 launches (FP8 rounding by
    comparison with device constants, no host copies); about 110 bytes moved per value."""
    S.k("quantize4", nbytes=110 * rows * n, calls=70)


def bsfa(bits):
    """Bsfa::step on device tensors, per covered block (norms, attention, MLP), per step."""
    S.phase, S.group = "opt", "BSFA projection"
    covered = [(nm, prod(sh)) for nm, sh, grp, _ in param_shapes() if grp in ("norm", "attn", "mlp")]
    k, m = BSFA_K, BSFA_L
    host = [0.0, 0.0]   # serial host work: per step, per re-estimation
    for _, n in covered:
        S.k("copy", nbytes=8 * n)                           # Before::of: flatten + copy
    # (the base step runs here)
    for _, n in covered:
        S.k("sub", nbytes=12 * n)                           # update = after - before
        if bits == 4:
            dequantize4(k, n)                               # Stored::matrix() of U
        S.k("gemm", flops=2.0 * k * n, nbytes=4 * k * n + 8 * n, peak=PEAK_FP32)   # U v
        S.k("gemm", flops=2.0 * k * n, nbytes=4 * k * n + 8 * n, peak=PEAK_FP32)   # U^T (U v)
        S.k("affine", nbytes=8 * n)
        S.k("affine", nbytes=8 * n)
        S.k("add", nbytes=12 * n)
        S.k("add", nbytes=12 * n)                           # after + correction
        S.k("copy", nbytes=8 * n)                           # Var::set
        if bits == 4:
            quantize4(1, n)                                 # Stored::keep of the update
    S.group = "BSFA re-estimation (per T)"
    re_kernels_start = len(S.kernels)
    for _, n in covered:
        if bits == 4:
            S.k("copy2d", nbytes=2 * (0.5 + 2 / 64) * m * n + 8 * m, calls=4 * m)  # concat
            dequantize4(m, n)                               # stacked history
        else:
            S.k("copy2d", nbytes=8 * n * m, calls=m)        # Tensor::cat of l rows
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("reduce-sum", nbytes=4 * m * n + 4 * n, eff=EFF_RED_STRIDED)   # mean over rows
        S.k("affine", nbytes=8 * n)
        S.k("h2d-layout", gpu=MIN_KERNEL)
        S.k("sub", nbytes=8 * m * n + 4 * n)                # centred
        S.k("gemm", flops=2.0 * m * m * n, nbytes=8 * m * n, peak=PEAK_FP32)       # Gram
        S.k("cast", nbytes=12 * m * m)
        S.k("sync", gpu=SYNC)                               # to_vec1
        host[1] += EIGEN                                    # nalgebra symmetric_eigen
        S.k("h2d-data", gpu=8 * k * m / PCIE + MIN_KERNEL)
        S.k("cast", nbytes=12 * k * m)
        S.k("gemm", flops=2.0 * k * m * n, nbytes=4 * m * n + 4 * k * n, peak=PEAK_FP32)
        if bits == 4:
            dequantize4(k, n)                               # old directions for the overlap
        S.k("gemm", flops=2.0 * k * k * n, nbytes=8 * k * n, peak=PEAK_FP32)       # overlap
        S.k("cast", nbytes=12 * k * k)
        S.k("sqr", nbytes=16 * k * k)
        S.k("reduce-sum", nbytes=8 * k * k)
        S.k("sync", gpu=SYNC)
        if bits == 4:
            quantize4(k, n)                                 # Stored::keep of the directions
    return host, re_kernels_start


# ============================================================================================
# Timing: host and device overlap
# ============================================================================================
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


# ============================================================================================
# Fused kernels: what each replaces and what it costs per micro-batch
# ============================================================================================
# FlashAttention-2-class kernels on H100 at head dim 64, causal, seq 1k (assumption), scaled by
# 48/64: head dim 48 runs in the 64-wide kernel.
FA_FWD = 250e12 * HD / 64
FA_BWD = 170e12 * HD / 64


def t_bw(nbytes, eff=EFF_BW):
    return nbytes / (HBM * eff)


def t_gemm(flops):
    return flops / (PEAK_BF16 * EFF_GEMM)


class Item:
    """A fused kernel (with its backward): the op groups it replaces, its GPU time and launches
    per micro-batch, and the gradients candle's autograd still zero-fills and adds for it."""

    def __init__(self, name, groups, gpu, calls, grad_bytes, grads):
        self.name, self.groups, self.gpu, self.calls = name, set(groups), gpu, calls
        self.grad_bytes, self.grads = grad_bytes, grads


def fused_items(micro):
    causal = 2.0 * B * H * T * T * HD              # QK^T and PV over the causal half, forward
    lin = [kn for kn in micro if kn.group == "linear GEMMs" and
           (kn.kind == "gemm" or (kn.phase == "fwd" and kn.kind == "cast"))]
    nc, ni = 2 * N * C, 2 * N * I                  # one bf16 activation of width C / I
    mat = 4 * sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in ("attn", "mlp"))
    return [
        Item("flash-attention fwd+bwd (causal mask, GQA, scale; reads heads in place)",
             ["attention (scores, softmax, heads)"],
             L * (causal / FA_FWD + 2.5 * causal / FA_BWD), L * 4, L * 3 * nc, L * 3),
        # chunks of rows; gradient made in the forward (Liger-style): 3 GEMMs of 2 N C V, the
        # bf16 logits chunk written once, read twice (8 bytes per logit), the head cast both ways
        Item("fused linear + cross-entropy (chunked vocabulary, logits never whole)",
             ["output head + cross-entropy"],
             3 * t_gemm(2.0 * N * C * V) + t_bw(8 * N * V) + t_bw(6 * V * C + 6 * V * C),
             4 * 12 + 4, nc + 4 * V * C, 2),
        # fwd: read x and the branch output, write x and y (bf16), the row rstd; bwd: read x, dy,
        # the residual gradient, write dx; weight gradient from per-block partial sums
        Item("fused residual-add + RMSNorm fwd+bwd", ["RMSNorm", "residual adds"],
             (2 * L + 1) * (t_bw(2 * N * C * 2 * 4 + 8 * N) + 4e-6), (2 * L + 1) * 4,
             (2 * L + 1) * nc, 2 * L + 1),
        Item("linear as one op (cuBLAS fwd/bwd in a CustomOp, f32 weight, dW in f32)",
             ["linear GEMMs"], sum(kn.time for kn in lin), sum(kn.calls for kn in lin),
             L * (6 * nc + ni) + mat, L * 14),
        # src/model/ops/embedding.cu: one block per vocabulary row writes its row once, reads
        # the rows of dy whose id it is, and scans all N ids (from L2, taken as 4x HBM)
        Item("embedding backward (one block per vocabulary row, no atomics: deterministic)",
             ["embedding"], t_bw(4 * V * C + 4 * N * C) + 4 * V * N / (4 * HBM) + 20e-6, 4,
             4 * V * C, 1),
        Item("fused RoPE fwd+bwd (in place on q and k)", ["RoPE"],
             L * 2 * 2 * t_bw(2 * nc), L * 4, L * 2 * nc, L * 2),
        Item("fused SwiGLU fwd+bwd (packed gate/up output)", ["SwiGLU (silu, product)"],
             L * t_bw(ni * (3 + 5)), L * 2, L * 2 * ni, L),
    ]


def fused_optimizer(block_mini):
    n = sum(prod(sh) for _, sh, _, _ in param_shapes())
    # AdamW: read p, g, m, v, write p, m, v (28 B); Adam-mini: v per block, g read twice (24 B);
    # one multi-tensor norm pass over the gradients and one sync
    per = 24 if block_mini else 28
    return t_bw(per * n) + t_bw(4 * n) + 6 * MIN_KERNEL + SYNC


def fused_bsfa(bits):
    n = sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in ("norm", "attn", "mlp"))
    k, m = BSFA_K, BSFA_L
    rb = 4 if bits == 32 else 0.5 + 2 / 64 + 4 / n   # bytes per stored value
    # U v and U^T c for every block in two batched launches (U read twice); the update written
    # to the history row by the Adam kernel and theta updated in place (16 B per value)
    step = t_bw(2 * rb * k * n + 16 * n) + 4 * MIN_KERNEL
    # Gram of the centred history in one pass (H H^T - m mu mu^T), directions C H, overlap
    # U_old U_new^T: history read twice, U written once and read twice; batched eigensolver on
    # the host with one sync
    refresh = (t_bw(2 * rb * m * n + 3 * rb * k * n) + 2.0 * m * m * n / (PEAK_BF16 * 0.3)
               + 55 * EIGEN + 2 * SYNC)
    return step, refresh


# ============================================================================================
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="kernel classes per op group")
    args = ap.parse_args()

    # parameters: f32 masters on the device
    S.phase, S.group = "setup", "parameters"
    weights = {"embed": var((V, C)), "layers": [], "norm": var((C,)), "head": var((V, C))}
    for _ in range(L):
        weights["layers"].append({
            "norm1": var((C,)), "q": var((C, C)), "k": var((KV * HD, C)), "v": var((KV * HD, C)),
            "o": var((C, C)), "norm2": var((C,)), "gate": var((I, C)), "up": var((I, C)),
            "down": var((C, I))})
    params = sum(prod(sh) for _, sh, _, _ in param_shapes())
    param_bytes = 4 * params
    assert S.live == param_bytes

    # one micro-batch: forward, then backward
    S.kernels = []
    S.kept.clear()
    loss = forward(weights)
    fwd_live = S.live - param_bytes
    _, orphan_bytes, var_grad_bytes = backward(loss)
    act_peak = S.peak - param_bytes
    micro = list(S.kernels)

    def collect(fn, *a):
        S.kernels = []
        out = fn(*a)
        return list(S.kernels), out

    accum, _ = collect(grad_accumulate)
    clipk, _ = collect(clip)
    adamw_k, _ = collect(adam, lambda name, shape, mini: 1)
    mini_k, _ = collect(adam, lambda name, shape, mini: prod(shape) if name == "norm" else mini)
    b32, (h32, re32) = collect(bsfa, 32)
    b4, (h4, re4) = collect(bsfa, 4)

    t_clip, t_accum = phase_time(clipk), phase_time(accum)
    t_adamw, t_mini = phase_time(adamw_k), phase_time(mini_k)
    t_b32, t_b32_re = phase_time(b32[:re32]) + h32[0], phase_time(b32[re32:]) + h32[1]
    # 4-bit: host decoding, pageable copies and encoding run one after the other
    t_b4, t_b4_re = phase_time(b4[:re4]) + h4[0], phase_time(b4[re4:]) + h4[1]

    nonembed = params - V * C
    flops_tok = 6 * nonembed + 12 * L * C * T
    print(f"llama134m: {params:,} parameters ({nonembed:,} besides the input embedding); "
          f"micro-batch {B} x {T} = {N:,} tokens; model FLOPs/token = 6 N + 12 L C T = "
          f"{flops_tok / 1e6:.1f} M; per micro-batch {flops_tok * N / 1e12:.2f} TFLOP "
          f"({flops_tok * N / PEAK_BF16 * 1e3:.2f} ms at 989 TFLOP/s)")

    # ---- the main table ----
    summ = summarize(micro)
    groups = ["embedding", "RMSNorm", "linear GEMMs", "RoPE", "attention (scores, softmax, heads)",
              "SwiGLU (silu, product)", "residual adds", "output head + cross-entropy"]
    print()
    print("| op | GFLOP | GB moved | ms (fwd + bwd) | launches | kept for bwd, GiB |")
    print("|---|---|---|---|---|---|")
    tot = [0, 0, 0, 0]
    for g in groups:
        f, b = summ[("fwd", g)], summ[("bwd", g)]
        row = [f[i] + b[i] for i in range(4)]
        tot = [tot[i] + row[i] for i in range(4)]
        print(f"| {g} | {row[0] / 1e9:,.0f} | {row[1] / 1e9:,.1f} | {fmt_ms(row[2])} "
              f"({fmt_ms(f[2])} + {fmt_ms(b[2])}) | {row[3]:,} | {S.kept[g] / GIB:.1f} |")
    print(f"| micro-batch (fwd + bwd) | {tot[0] / 1e9:,.0f} | {tot[1] / 1e9:,.1f} | "
          f"{fmt_ms(tot[2])} | {tot[3]:,} | {fwd_live / GIB:.1f} |")
    for name, ks, t in [("gradient accumulation, per extra micro-batch", accum, t_accum),
                        ("clipping: global norm (one sync per tensor)", clipk, t_clip),
                        ("AdamW (tensor ops)", adamw_k, t_adamw),
                        ("Adam-mini (tensor ops)", mini_k, t_mini),
                        ("BSFA f32: projection, every step", b32[:re32], t_b32),
                        ("BSFA f32: re-estimation, every T = 10 steps", b32[re32:], t_b32_re),
                        ("BSFA 4-bit: projection, every step", b4[:re4], t_b4),
                        ("BSFA 4-bit: re-estimation, every T = 10 steps", b4[re4:], t_b4_re)]:
        fl = sum(kn.flops for kn in ks) / 1e9
        gb = sum(kn.bytes for kn in ks) / 1e9
        calls = sum(kn.calls for kn in ks)
        print(f"| {name} | {fl:,.0f} | {gb:,.1f} | {fmt_ms(t)} | {calls:,} | |")
    host_micro = tot[3] * LAUNCH + L * MASK_HOST
    t_micro = max(tot[2], host_micro) + SYNC
    print(f"micro-batch: GPU {fmt_ms(tot[2])} ms, host {fmt_ms(host_micro)} ms "
          f"({tot[3]:,} launches at {LAUNCH * 1e6:.0f} us + masks) -> {fmt_ms(t_micro)} ms")
    first = [kn for kn in micro if kn.first]  # zero-fills and the adds into them
    print(f"of which autograd zero-fill + add of first gradients: "
          f"{sum(kn.bytes for kn in first) / 1e9:.0f} GB, {fmt_ms(sum(kn.time for kn in first))} ms")

    # ---- step times ----
    opt = {"AdamW": t_clip + t_adamw,
           "Adam-mini + BSFA f32": t_clip + t_mini + t_b32 + t_b32_re / BSFA_T,
           "Adam-mini + BSFA 4-bit": t_clip + t_mini + t_b4 + t_b4_re / BSFA_T}

    def steps(micro_t, opt_t):
        bench = micro_t + opt_t
        preset = MICRO_PER_STEP * micro_t + (MICRO_PER_STEP - 1) * t_accum + opt_t
        return bench, preset

    def mfu(tokens, secs):
        return flops_tok * tokens / secs / PEAK_BF16

    print()
    print("| reference path | bench step (batch 12) | tokens/s | MFU | preset step (480 x 1024) "
          "| tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, o in opt.items():
        s1, s40 = steps(t_micro, o)
        print(f"| {name} | {fmt_ms(s1)} ms | {N / s1:,.0f} | {mfu(N, s1) * 100:.1f}% | "
              f"{s40:.2f} s | {MICRO_PER_STEP * N / s40:,.0f} | "
              f"{mfu(MICRO_PER_STEP * N, s40) * 100:.1f}% |")

    # ---- memory (GiB: an "80 GB" H100 shows 81,559 MiB = 79.6 GiB in nvidia-smi) ----
    mom_adamw = 2 * param_bytes
    blocks_mini = sum(prod(sh) // (prod(sh) if nm == "norm" else mb)
                      for nm, sh, _, mb in param_shapes())
    mom_mini = param_bytes + 4 * blocks_mini
    covered = sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in ("norm", "attn", "mlp"))
    bsfa32_state = 4 * (BSFA_K + BSFA_L) * covered
    # 4-bit rows on the device: half a byte per value, a scale and a zero byte per 64 values
    bsfa4_state = (0.5 + 2 / 64) * (BSFA_K + BSFA_L) * covered
    runtime = GIB                     # CUDA context, cuBLAS workspace
    usable = 81559 * 2**20 * 0.95     # 5% left to allocator fragmentation
    print()
    print(f"forward graph (activations kept for backward): {fwd_live / GIB:.1f} GiB; peak during "
          f"the backward: {act_peak / GIB:.1f} GiB (gradient store included); orphan gradients of "
          f"untracked operands, held to the end: {orphan_bytes / GIB:.1f} GiB")
    print(f"parameters f32 {param_bytes / GIB:.2f} GiB; gradient accumulator {param_bytes / GIB:.2f} "
          f"GiB; AdamW moments {mom_adamw / GIB:.2f} GiB; Adam-mini {mom_mini / GIB:.2f} GiB; BSFA "
          f"f32 state {bsfa32_state / GIB:.1f} GiB (4-bit: {bsfa4_state / GIB:.1f} GiB); runtime 1 GiB")
    # after the fusions: about what the fused CPU path keeps (llama::activation_bytes without
    # its vocabulary term, in bf16), one f32 logits chunk of 1024 rows, gradients in flight
    fused_act = N * (12 * C + 3 * I) * L * 2 + 1024 * V * 4 + 2 * N * C * 4
    print()
    print("| run | peak GPU memory, micro-batch 12 | fits an 80 GB H100 (79.6 GiB)? "
          "| largest micro-batch dividing 480 (5% margin) | after the fusions |")
    print("|---|---|---|---|---|")
    for name, fixed in [("AdamW", 2 * param_bytes + mom_adamw + runtime),
                        ("Adam-mini + BSFA f32", 2 * param_bytes + mom_mini + bsfa32_state + runtime),
                        ("Adam-mini + BSFA 4-bit", 2 * param_bytes + mom_mini + bsfa4_state + runtime)]:
        peak = fixed + act_peak
        mb = int((usable - fixed) // (act_peak / B))
        while 480 % mb:               # train.micro_batch_size must divide train.batch_size
            mb -= 1
        print(f"| {name} | {peak / GIB:.1f} GiB | {'yes' if peak <= usable else 'no'} | {mb} "
              f"({(fixed + act_peak * mb / B) / GIB:.1f} GiB) | {(fixed + fused_act) / GIB:.1f} GiB |")

    # ---- fusions, largest saving first ----
    items = fused_items(micro)
    state = {"replaced": set(), "gpu": 0.0, "calls": 0, "gbytes": 0.0, "grads": 0,
             "patched": False}
    opt_now = {"AdamW": opt["AdamW"], "Adam-mini + BSFA f32": opt["Adam-mini + BSFA f32"]}
    base_mini = [t_clip + t_mini]
    bsfa_now = [t_b32 + t_b32_re / BSFA_T]
    fb_step, fb_re = fused_bsfa(32)

    def micro_time(st):
        ks = [kn for kn in micro if kn.group not in st["replaced"]
              and not (st["patched"] and kn.first is True)]
        gpu = sum(kn.time * (2 / 3 if st["patched"] and kn.first == "copy" else 1)
                  for kn in ks) + st["gpu"]
        calls = sum(kn.calls for kn in ks) + st["calls"]
        if not st["patched"]:
            gpu += t_bw(4 * st["gbytes"])
            calls += 2 * st["grads"]
        mask = 0 if "attention (scores, softmax, heads)" in st["replaced"] else L * MASK_HOST
        return max(gpu, calls * LAUNCH + mask) + SYNC, gpu, calls

    def with_item(st, it):
        st2 = dict(st)
        st2["replaced"] = st["replaced"] | it.groups
        st2["gpu"] = st["gpu"] + it.gpu
        st2["calls"] = st["calls"] + it.calls
        st2["gbytes"] = st["gbytes"] + it.grad_bytes
        st2["grads"] = st["grads"] + it.grads
        return st2

    def row(label, saving, st):
        m = micro_time(st)[0]
        a1, a40 = steps(m, opt_now["AdamW"])
        b1, b40 = steps(m, opt_now["Adam-mini + BSFA f32"])
        print(f"| {label} | {saving} | {fmt_ms(a1)} ms, {mfu(N, a1) * 100:.1f}% "
              f"| {fmt_ms(b1)} ms, {mfu(N, b1) * 100:.1f}% "
              f"| {a40:.2f} s, {mfu(MICRO_PER_STEP * N, a40) * 100:.1f}% "
              f"| {b40:.2f} s, {mfu(MICRO_PER_STEP * N, b40) * 100:.1f}% |")

    print()
    print("| after (cumulative) | saving per bench step | bench AdamW | bench Adam-mini + BSFA f32 "
          "| preset AdamW | preset Adam-mini + BSFA f32 |")
    print("|---|---|---|---|---|---|")
    row("reference path (today)", "", state)
    pending = {it.name: it for it in items}
    extra = ["fused AdamW / Adam-mini and gradient norm (multi-tensor apply, one sync)",
             "BSFA projection and re-estimation as batched GEMMs (state on the device)",
             "autograd: a tensor's first gradient moved in, not zero-filled and added "
             "(candle patch)"]
    pending.update({e: None for e in extra})
    while pending:
        cur = micro_time(state)[0]
        best, best_save = None, -1.0
        for name, it in pending.items():
            if it is not None:
                save = cur - micro_time(with_item(state, it))[0]
            elif name.startswith("fused AdamW"):
                save = opt_now["AdamW"] - fused_optimizer(False)
            elif name.startswith("BSFA"):
                save = bsfa_now[0] - (fb_step + fb_re / BSFA_T)
            else:
                st2 = dict(state)
                st2["patched"] = True
                save = cur - micro_time(st2)[0]
            if save > best_save:
                best, best_save = name, save
        it = pending.pop(best)
        if it is not None:
            state = with_item(state, it)
            label = f"{fmt_ms(best_save)} ms"
        elif best.startswith("fused AdamW"):
            opt_now["AdamW"] = fused_optimizer(False)
            base_mini[0] = fused_optimizer(True)
            opt_now["Adam-mini + BSFA f32"] = base_mini[0] + bsfa_now[0]
            label = f"{fmt_ms(best_save)} ms (AdamW)"
        elif best.startswith("BSFA"):
            bsfa_now[0] = fb_step + fb_re / BSFA_T
            opt_now["Adam-mini + BSFA f32"] = base_mini[0] + bsfa_now[0]
            label = f"{fmt_ms(best_save)} ms (BSFA)"
        else:
            state["patched"] = True
            label = f"{fmt_ms(best_save)} ms"
        row("+ " + best, label, state)

    m, gpu, calls = micro_time(state)
    gemm = sum(kn.time for kn in micro if kn.group == "linear GEMMs" and kn.kind == "gemm")
    head = [it for it in items if it.name.startswith("fused linear")][0].gpu
    fa = [it for it in items if it.name.startswith("flash")][0].gpu
    print()
    print(f"fused end state per micro-batch: {fmt_ms(m)} ms: linear-layer GEMMs {fmt_ms(gemm)}, "
          f"output head + CE {fmt_ms(head)}, flash-attention {fmt_ms(fa)}, the rest "
          f"{fmt_ms(gpu - gemm - head - fa)} ms; {calls} launches ({fmt_ms(calls * LAUNCH)} ms host)")
    print(f"optimizer per step after fusion: AdamW {fmt_ms(opt_now['AdamW'])} ms; Adam-mini + BSFA "
          f"f32 {fmt_ms(opt_now['Adam-mini + BSFA f32'])} ms (BSFA projection {fmt_ms(fb_step)} ms, "
          f"re-estimation {fmt_ms(fb_re)} ms every {BSFA_T} steps)")
    f4_step, f4_re = fused_bsfa(4)
    print(f"BSFA with 4-bit state kept on the device, decoded inside the kernels: projection "
          f"{fmt_ms(f4_step)} ms, re-estimation {fmt_ms(f4_re)} ms")

    if args.kernels:
        print()
        by = defaultdict(lambda: [0, 0.0, 0.0])
        for kn in micro:
            r = by[(kn.phase, kn.group, kn.kind)]
            r[0] += kn.calls
            r[1] += kn.bytes
            r[2] += kn.time
        for key in sorted(by, key=lambda k: -by[k][2]):
            c, b, t = by[key]
            print(f"{key[0]:4} {key[1]:38} {key[2]:14} calls {c:5d}  {b / 1e9:8.2f} GB  "
                  f"{t * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
