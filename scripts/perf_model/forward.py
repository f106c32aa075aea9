"""The forward pass of `Llama::loss` on CUDA in bf16, at any model shape (`Dims`): through the
`reference` ops of src/model/ops (candle primitives), or with our CUDA kernels (cuda.py) where
`kernels` names them."""
from . import cuda
from .hw import SYNC, prod
from .sim import (S, Tensor, affine, bbinary, binary, cat, const, contiguous, detach, gather,
                  index_select, matmul, narrow, reduce, reshape, to_dtype, transpose, unary, var,
                  view)


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
    ms = affine(reduce(unary(xf, "sqr"), [len(xf.shape) - 1], True, "sum"), 1.0 / x.shape[-1])
    inv = unary(unary(affine(ms, 1.0, 1e-5), "sqrt"), "recip")
    y = bbinary(bbinary(xf, inv, "mul"), w, "mul")
    return to_dtype(y, "bf16")


def norm(x, w, kernels):
    """Llama::norm through our kernels where `kernels` names them, else the reference."""
    return cuda.rms_norm(x, w) if "rms_norm" in kernels else rms_norm(x, w)


def rope(x, cos, sin):
    """ops::rope::reference::rope."""
    S.group = "RoPE"
    b, t, width = x.shape
    hd = cos.shape[-1]
    x4 = reshape(x, (b, t, width // hd, hd))
    x1 = narrow(x4, 3, 0, hd // 2)
    x2 = narrow(x4, 3, hd // 2, hd // 2)
    rotated = cat([unary(x2, "neg"), x1], 3)
    cu, su = view(cos, (t, 1, hd), "reshape"), view(sin, (t, 1, hd), "reshape")
    y = binary(bbinary(x4, cu, "mul"), bbinary(rotated, su, "mul"), "add")
    return reshape(y, (b, t, width))


def attention(d, x, wq, wk, wv, wo, cos, sin):
    """ops::attention off the fused path: three linear layers and
    ops::causal_attention::reference::causal_attention, then the output projection."""
    q, k, v = linear(x, wq), linear(x, wk), linear(x, wv)
    q = rope(q, cos, sin)
    S.group = "attention (scores, softmax, heads)"
    q = affine(q, 1.0 / d.HD ** 0.5)

    def split(t, n):
        return contiguous(transpose(reshape(t, (d.B, d.T, n, d.HD)), 1, 2))

    q = split(q, d.H)
    k = rope(k, cos, sin)
    S.group = "attention (scores, softmax, heads)"
    k = split(k, d.KV)            # repeat_kv is the identity at kv_heads == heads
    v = split(v, d.KV)
    mask = const((d.T, d.T), "bf16")
    scores = bbinary(matmul(q, transpose(k, 2, 3)), mask, "add")
    wide = to_dtype(scores, "f32")
    mx = detach(reduce(wide, [3], True, "max"))
    ex = unary(bbinary(wide, mx, "sub"), "exp")
    probs = to_dtype(bbinary(ex, reduce(ex, [3], True, "sum"), "div"), "bf16")
    out = reshape(transpose(matmul(probs, v), 1, 2), (d.B, d.T, d.C))
    return linear(out, wo)


def add_norm(x, delta, w, kernels):
    """ops::add_rms_norm: the residual add and the norm after it (fused on CUDA)."""
    if "residual_rms_norm" in kernels:
        return cuda.add_rms_norm(x, delta, w)
    S.group = "residual adds"
    x = binary(x, delta, "add")
    return x, norm(x, w, kernels)


def forward(d, weights, kernels=frozenset()):
    """`Llama::loss` of one micro-batch of shape `d`, then train/step.rs's weighting: the root
    of the graph `Tensor::backward` walks. `kernels`: which of cuda.KERNELS run (none is
    `train.kernels=reference`, the graph tests/perf_model.rs traces)."""
    assert set(kernels) <= set(cuda.KERNELS), kernels
    S.phase = "fwd"
    S.group = "embedding"
    if "embedding" in kernels:
        emb = cuda.embedding(d, weights["embed"])
    else:
        emb = index_select(weights["embed"], d.N)
    x = to_dtype(reshape(emb, (d.B, d.T, d.C)), "bf16")
    S.group = "RoPE"
    cos = to_dtype(Tensor((d.T, d.HD), "f32"), "bf16")
    sin = to_dtype(Tensor((d.T, d.HD), "f32"), "bf16")
    layers = weights["layers"]
    # each branch's output added to the stream with the norm after it (llama.rs: add_rms_norm)
    h = norm(x, layers[0]["norm1"], kernels) if layers else norm(x, weights["norm"], kernels)
    for i, layer in enumerate(layers):
        c = {n: cast_weight(w) for n, w in layer.items() if not n.startswith("norm")}
        if "attention" in kernels:
            a = linear(cuda.attention(d, h, c["q"], c["k"], c["v"]), c["o"])
        else:
            a = attention(d, h, c["q"], c["k"], c["v"], c["o"], cos, sin)
        x, h = add_norm(x, a, layer["norm2"], kernels)
        if "swiglu" in kernels:
            m = linear(cuda.swiglu(h, c["gate"], c["up"]), c["down"])
        else:
            S.group = "SwiGLU (silu, product)"
            g = linear(h, c["gate"])
            u = linear(h, c["up"])
            S.group = "SwiGLU (silu, product)"
            m = linear(binary(unary(g, "silu"), u, "mul"), c["down"])
        following = layers[i + 1]["norm1"] if i + 1 < len(layers) else weights["norm"]
        x, h = add_norm(x, m, following, kernels)
    S.group = "output head + cross-entropy"
    hidden = reshape(h, (d.N, d.C))
    if "cross_entropy" in kernels:
        loss = cuda.linear_cross_entropy(d, hidden, cast_weight(weights["head"], S.group))
        return weigh(loss)
    # Llama::loss: linear_cross_entropy -> reference linear + widened cross_entropy
    logits = reshape(matmul(reshape(hidden, (d.N, d.C)),
                            transpose(cast_weight(weights["head"], S.group), 0, 1)), (d.N, d.V))
    S.group = "output head + cross-entropy"
    lf = to_dtype(logits, "f32")
    mx = detach(reduce(lf, [1], True, "max"))
    shifted = bbinary(lf, mx, "sub")
    lse = unary(reduce(unary(shifted, "exp"), [1], True, "sum"), "log")
    loss = reduce(binary(lse, gather(shifted, d.N), "sub"), [0, 1], False, "sum")
    return weigh(affine(loss, 1.0 / d.N))


def weigh(loss):
    """train/step.rs: loss.to_dtype(F64).to_scalar() (a sync), then (loss * weight)."""
    S.k("cast", nbytes=12)
    S.k("sync", gpu=SYNC)
    return affine(loss, 1.0)


def make_weights(d):
    """The f32 master weights on the device, in `Llama::new`'s order."""
    weights = {"embed": var((d.V, d.C)), "layers": [], "norm": var((d.C,)),
               "head": var((d.V, d.C))}
    for _ in range(d.L):
        weights["layers"].append({
            "norm1": var((d.C,)), "q": var((d.C, d.C)), "k": var((d.KV * d.HD, d.C)),
            "v": var((d.KV * d.HD, d.C)), "o": var((d.C, d.C)), "norm2": var((d.C,)),
            "gate": var((d.I, d.C)), "up": var((d.I, d.C)), "down": var((d.C, d.I))})
    return weights
