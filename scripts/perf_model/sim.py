"""Kernels, device memory and the forward primitives, as candle-core 0.11.1 implements them.

`S` is the one simulation every op of a process records into: its kernels (FLOPs, bytes, time)
and its live and peak device memory. A `Tensor` records candle's backprop graph: its op, its
arguments and the storage it shares with them (views) or owns."""
from collections import defaultdict

from .hw import (DB, EFF_BW, EFF_GEMM, EFF_GEMM_F32, EFF_RED_STRIDED, EFF_STRIDED, HBM,
                 MASK_HOST, MIN_KERNEL, PCIE, PEAK_BF16, PEAK_FP32, prod)


class Kernel:
    __slots__ = ("phase", "group", "kind", "flops", "bytes", "time", "calls", "first")


class Sim:
    def __init__(self):
        self.reset()

    def reset(self):
        """A fresh process: each simulated run starts from an empty device."""
        self.kernels = []
        self.phase = "fwd"
        self.group = "misc"
        self.live = 0
        self.peak = 0
        self.kept = defaultdict(int)    # bytes allocated in the forward, per op group
        self.host = 0.0                 # serial host work besides launches (causal masks)
        self.patched = True             # candle with our autograd patch (backward.py)

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
    S.host += MASK_HOST
    S.k("h2d-data", gpu=t.nbytes / PCIE)
    return to_dtype(t, dtype)


def custom(args, shape, dtype, bwd):
    """A candle `CustomOp` node over `args`: the caller records its forward kernels, and
    `bwd(backward, node, grad)` runs its backward (the gradients it returns are accumulated
    into `args` as candle accumulates any other)."""
    return Tensor(shape, dtype, op=rec("custom", *args), args=args, meta=bwd)

