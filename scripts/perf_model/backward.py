"""candle-core 0.11.1's `Tensor::backward` (backprop.rs), replayed node by node. As released
(`S.patched` false), every gradient contribution is `grads.or_insert(arg)` (a zero-filled tensor)
plus an `add`, and untracked operands still get a full-size gradient that stays in the store to
the end; with our patch (vendor/candle-core, `GradStore::accumulate`) a first gradient is stored
as it is (copied if strided, negated if subtracted) and untracked operands get none."""
from .hw import (DB, EFF_BW, EFF_MEMSET, EFF_RED_STRIDED, EFF_STRIDED, INDEX_ADD_ITER,
                 MIN_KERNEL, PEAK_BF16, PEAK_FP32, prod)
from .sim import S


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



class Backward:
    """The gradient store of one `backward` call and candle's rule for each op kind."""

    def __init__(self, root):
        self.store = {}
        self.order = sorted_nodes(root)
        self.orphans = set()
        self.tracked_ids = {n.id for n in self.order}

    def accumulate(self, target, g, sub=False):
        """grads.or_insert(target) (zeros_like: memset) then add/sub: a new contiguous tensor;
        patched, a first gradient is kept as it is (a copy if strided, a negation if
        subtracted) and an untracked target gets none."""
        untracked = not target.tracked or (target.id not in self.tracked_ids and not target.var)
        if S.patched:
            if untracked:
                return
            if target.id not in self.store:
                if sub or not g.contig:
                    new = g_elementwise("neg" if sub else "copy", [g], target.shape, target.dtype)
                else:
                    new = Grad(target.shape, target.dtype)   # the caller's tensor, moved in
                self.store[target.id] = new
                return
        old = self.store.get(target.id)
        first = old is None
        if first:
            old = Grad(target.shape, target.dtype)
            S.k("memset", nbytes=old.nbytes, eff=EFF_MEMSET).first = True
            if untracked:
                self.orphans.add(target.id)
        new = g_elementwise("sub" if sub else "add", [old, g], target.shape, target.dtype)
        if first:
            # moved in instead, a first gradient would still need a copy if strided (matmul
            # wants its layouts) and a negation if subtracted
            S.kernels[-1].first = "copy" if (sub or not g.contig) else True
        S.free(old.nbytes)
        self.store[target.id] = new

    def through(self, name, arg, grad, ins=None):
        """One elementwise kernel of `ins` (the gradient by default) into `arg`'s gradient."""
        t = g_elementwise(name, ins or [grad], arg.shape, arg.dtype)
        self.accumulate(arg, t)
        temp_done(t)

    def chain(self, arg, grad, names, sub=False):
        """Kernels one after the other, each reading the last (the first the gradient and, a
        view of the same size, the node), the last one accumulated into `arg`."""
        t = g_elementwise(names[0], [grad, Grad.view(grad)], arg.shape, arg.dtype)
        for name in names[1:]:
            prev, t = t, g_elementwise(name, [t], arg.shape, arg.dtype)
            temp_done(prev)
        self.accumulate(arg, t, sub=sub)
        temp_done(t)

    def run(self, root):
        S.phase = "bwd"
        S.group = "output head + cross-entropy"
        seed = Grad(root.shape, root.dtype)
        S.k("fill", nbytes=seed.nbytes)
        self.store[root.id] = seed
        for node in self.order:
            if node.var:
                continue
            grad = self.store.pop(node.id)
            S.group = node.group
            RULES[node.op](self, node, grad)
            temp_done(grad)
        store, orphans = self.store, self.orphans
        orphan_bytes = sum(store[i].nbytes for i in orphans if i in store)
        var_grad_bytes = sum(g.nbytes for i, g in store.items() if i not in orphans)
        return store, orphan_bytes, var_grad_bytes


def temp_done(*gs):
    for g in gs:
        if g.owned:
            S.free(g.nbytes)


def backward(root):
    """Tensor::backward from `root`: the store left (gradients of the variables and of the
    untracked operands), the bytes of the latter and of the former."""
    return Backward(root).run(root)


def rule_add_sub(bw, node, grad):
    bw.accumulate(node.args[0], grad)
    bw.accumulate(node.args[1], grad, sub=node.op == "sub")


def rule_mul(bw, node, grad):
    lhs, rhs = node.args
    for out, other in ((lhs, rhs), (rhs, lhs)):
        bw.through("mul", out, grad,
                   [grad, Grad.view(grad, bcast_src=other.read_bytes(), contig=other.contig)])


def rule_div(bw, node, grad):
    lhs, rhs = node.args
    r = Grad.view(grad, bcast_src=rhs.read_bytes(), contig=rhs.contig)
    bw.through("div", lhs, grad, [grad, r])
    t1 = g_elementwise("mul", [grad, Grad.view(grad)], lhs.shape, lhs.dtype)
    sq = g_elementwise("sqr", [r], rhs.shape, rhs.dtype)  # rhs.sqr() of a broadcast view
    t2 = g_elementwise("div", [t1, sq], rhs.shape, rhs.dtype)
    temp_done(t1, sq)
    bw.accumulate(rhs, t2, sub=True)
    temp_done(t2)


def rule_matmul(bw, node, grad):
    lhs, rhs = node.args
    *batch, m, k = lhs.shape
    n = rhs.shape[-1]
    bsz = prod(batch)
    peak = PEAK_BF16 if lhs.dtype == "bf16" else PEAK_FP32
    for out, other in ((lhs, rhs), (rhs, lhs)):
        t = Grad(out.shape, out.dtype)
        S.k("gemm", flops=2.0 * bsz * m * n * k,
            nbytes=grad.nbytes + other.nbytes + t.nbytes, peak=peak)
        bw.accumulate(out, t)
        temp_done(t)


def rule_broadcast(bw, node, grad):
    (arg,) = node.args
    t = Grad(arg.shape, arg.dtype)
    lead = len(node.shape) - len(arg.shape)
    dims = list(range(lead)) + [i + lead for i, (a, b) in
                                enumerate(zip(arg.shape, node.shape[lead:])) if a != b]
    last = all(d >= len(node.shape) - len(dims) for d in dims)
    S.k("h2d-layout", gpu=MIN_KERNEL)
    S.k("reduce-sum", nbytes=grad.nbytes + t.nbytes,
        eff=EFF_BW if last else EFF_RED_STRIDED)
    bw.accumulate(arg, t)
    temp_done(t)


def rule_sum(bw, node, grad):
    (arg,) = node.args
    bw.accumulate(arg, Grad.view(grad, shape=arg.shape, contig=False, bcast_src=grad.nbytes))


def rule_view(bw, node, grad):
    """copy, reshape, transpose: the gradient passes through as a view."""
    (arg,) = node.args
    contig = False if node.op == "transpose" else None
    bw.accumulate(arg, Grad.view(grad, shape=arg.shape, contig=contig))


def rule_recip(bw, node, grad):
    (arg,) = node.args
    sq = g_elementwise("sqr", [Grad.view(grad)], arg.shape, arg.dtype)
    t = g_elementwise("div", [grad, sq], arg.shape, arg.dtype)
    temp_done(sq)
    bw.accumulate(arg, t, sub=True)
    temp_done(t)


def rule_silu(bw, node, grad):
    (arg,) = node.args
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
    bw.accumulate(arg, t)
    temp_done(t)


def rule_narrow(bw, node, grad):
    (arg,) = node.args
    pad = Grad(arg.shape[:-1] + (arg.shape[-1] - node.shape[-1],), arg.dtype)
    S.k("memset", nbytes=pad.nbytes, eff=EFF_MEMSET)
    full = Grad(arg.shape, arg.dtype)
    S.k("copy2d", nbytes=2 * pad.nbytes, calls=1)
    S.k("copy2d", nbytes=2 * grad.nbytes, calls=1)
    temp_done(pad)
    bw.accumulate(arg, full)
    temp_done(full)


def rule_cat(bw, node, grad):
    """Narrowed views of the gradient: contiguous when the cat was along the first dim."""
    for a in node.args:
        bw.accumulate(a, Grad.view(grad, shape=a.shape, contig=node.meta == 0))


def rule_scatter(bw, node, grad):
    """index_select (index_add into zeros, V x C f32) and gather (scatter_add): each copies
    its zeroed destination first, then runs its kernel."""
    (arg,) = node.args
    old = bw.store.get(arg.id)
    if old is None:
        old = Grad(arg.shape, arg.dtype)
        S.k("memset", nbytes=old.nbytes, eff=EFF_MEMSET)
    new = Grad(arg.shape, arg.dtype)
    S.k("copy", nbytes=2 * new.nbytes)
    if node.op == "index_select":
        S.k("index_add", nbytes=grad.nbytes * 3, gpu=grad.shape[0] * INDEX_ADD_ITER)
    else:
        S.k("scatter_add", nbytes=grad.nbytes * 3)
    S.free(old.nbytes)
    bw.store[arg.id] = new


RULES = {
    "add": rule_add_sub,
    "sub": rule_add_sub,
    "mul": rule_mul,
    "div": rule_div,
    "matmul": rule_matmul,
    "broadcast": rule_broadcast,
    "sum": rule_sum,
    "to_dtype": lambda bw, node, grad: bw.through("cast", node.args[0], grad),
    "copy": rule_view,
    "reshape": rule_view,
    "transpose": rule_view,
    "affine": lambda bw, node, grad: bw.through("affine", node.args[0], grad),
    "exp": lambda bw, node, grad: bw.through("mul", node.args[0], grad,
                                             [grad, Grad.view(grad)]),
    "log": lambda bw, node, grad: bw.through("div", node.args[0], grad,
                                             [grad, Grad.view(grad)]),
    "sqr": lambda bw, node, grad: bw.chain(node.args[0], grad, ["mul", "affine"]),
    "sqrt": lambda bw, node, grad: bw.chain(node.args[0], grad, ["div", "affine"]),
    "recip": rule_recip,
    "neg": lambda bw, node, grad: bw.accumulate(node.args[0], grad, sub=True),
    "silu": rule_silu,
    "narrow": rule_narrow,
    "cat": rule_cat,
    "index_select": rule_scatter,
    "gather": rule_scatter,
    "custom": lambda bw, node, grad: node.meta(bw, node, grad),
}
