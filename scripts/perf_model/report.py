"""The tables of docs/gpu.md, printed from a simulated `Run` of llama134m."""
from collections import defaultdict

from .cuda import ce_extra_bytes
from .fused import fmt_ms, summarize
from .hw import (B, BSFA_GROUPS, BSFA_K, BSFA_L, BSFA_T, C, GIB, I, L, LAUNCH, LLAMA134M,
                 MICRO_PER_STEP, N, PEAK_BF16, T, prod)
from .optim import param_shapes

GROUPS = ["embedding", "RMSNorm", "linear GEMMs", "RoPE", "attention (scores, softmax, heads)",
          "SwiGLU (silu, product)", "residual adds", "output head + cross-entropy"]

# What each op group runs, on the reference path (train.kernels=reference, or kernels that
# failed their self-check) and where the CUDA path now differs.
RUNS_REFERENCE = {
    "embedding": "f32 `index_select`, cast to bf16; backward: `index_add` into a zeroed f32 "
                 "`V x C` copy",
    "RMSNorm": "cast to f32, sqr, sum, 4 scalar ops, 2 broadcast muls, cast back",
    "linear GEMMs": "weight cast, reshape, `w.t()`, bf16 GEMM, reshape",
    "RoPE": "narrow, neg, cat, 2 broadcast muls, add",
    "attention (scores, softmax, heads)": "scale, 3 head-transpose copies, host-built mask, "
                                          "`QK^T`, mask add, widen, max/sub/exp/sum/div, cast, "
                                          "`PV`, merge copy",
    "SwiGLU (silu, product)": "silu, product (gate and up are linear layers)",
    "residual adds": "bf16 add",
    "output head + cross-entropy": "head cast, bf16 GEMM to `N x V` logits, widen to f32, "
                                   "max/sub/exp/sum/log, gather, mean",
}
RUNS_NOW = dict(RUNS_REFERENCE, **{
    "embedding": "f32 `index_select`, cast to bf16; backward: `embedding.cu`, one block per "
                 "vocabulary row",
    "RMSNorm": "Triton kernels on the bf16 rows, f32 weight, the residual add fused in (the "
               "stream and its norm in one kernel); backward: dx kernel adding the stream's "
               "gradient, dw parts kernel, sum of the parts",
    "residual adds": "fused into RMSNorm",
    "linear GEMMs": "as the reference; q, k, v as one GEMM, gate and up as another, each over "
                    "the weights concatenated (a copy of them per micro-batch)",
    "SwiGLU (silu, product)": "Triton kernel on the packed gate/up output; backward: one kernel",
    "RoPE": "the tables' casts only: RoPE is applied inside the attention kernels",
    "attention (scores, softmax, heads)": "Triton FlashAttention-2 on the packed qkv, RoPE on "
                                          "load; backward: delta, dkdv, dq kernels",
    "output head + cross-entropy": "head cast; per chunk of 2,560 rows: logits GEMM, lse "
                                   "kernel, gather, gradient kernel in place, dx and dW GEMMs, "
                                   "dW widened and summed in f32; backward: two scalings",
})


def print_header(r):
    print(f"llama134m: {r.params:,} parameters ({r.nonembed:,} besides the input embedding); "
          f"micro-batch {B} x {T} = {N:,} tokens; model FLOPs/token = 6 N + 12 L C T = "
          f"{r.flops_tok / 1e6:.1f} M; per micro-batch {r.flops_tok * N / 1e12:.2f} TFLOP "
          f"({r.flops_tok * N / PEAK_BF16 * 1e3:.2f} ms at 989 TFLOP/s)")


def print_op_table(r, runs, optimizer):
    """Per op group of the micro-batch (what it runs: `runs`), then with `optimizer` the
    optimizer rows; returns the micro-batch time."""
    summ = summarize(r.micro)
    print()
    print("| op | what the CUDA build runs | GFLOP | GB moved | ms (fwd + bwd) | launches "
          "| kept for bwd, GiB |")
    print("|---|---|---|---|---|---|---|")
    tot = [0, 0, 0, 0]
    for g in GROUPS:
        f, b = summ[("fwd", g)], summ[("bwd", g)]
        row = [f[i] + b[i] for i in range(4)]
        tot = [tot[i] + row[i] for i in range(4)]
        print(f"| {g} | {runs[g]} | {row[0] / 1e9:,.0f} | {row[1] / 1e9:,.1f} | "
              f"{fmt_ms(row[2])} ({fmt_ms(f[2])} + {fmt_ms(b[2])}) | {row[3]:,} | "
              f"{r.kept.get(g, 0) / GIB:.1f} |")
    print(f"| **micro-batch** (fwd + bwd) | | {tot[0] / 1e9:,.0f} | {tot[1] / 1e9:,.1f} | "
          f"{fmt_ms(tot[2])} | {tot[3]:,} | {r.fwd_live / GIB:.1f} |")
    if optimizer:
        b32, b4, re32, re4 = r.b32, r.b4, r.re32, r.re4
        for name, what, ks, t in [
                ("gradient accumulation", "`acc + g` per parameter, per extra micro-batch",
                 r.accum, r.t_accum),
                ("clipping", "`sqr`, `sum_all`, `to_scalar` per tensor: 57 syncs", r.clipk,
                 r.t_clip),
                ("AdamW", "`update_with_tensor_ops`: 17 elementwise/reduce ops, `cat`, "
                 "`Var::set` per tensor", r.adamw_k, r.t_adamw),
                ("Adam-mini", "the same with one second moment per block", r.mini_k, r.t_mini),
                ("BSFA f32, every step", "copy before the step, difference, `U v` and `U^T (U "
                 "v)` (f32 GEMVs, `U` read twice), 3 elementwise, `Var::set`, the update "
                 "written into the history's ring", b32[:re32], r.t_b32),
                ("BSFA f32, every 10 steps", "the ring read in place; per block the product of "
                 "the 10 rows written since with all 60 (f32), one read-back for every block, "
                 "centring and eigenproblems on the host (16 threads), `(C P) H`, overlap, one "
                 "more read-back", b32[re32:], r.t_b32_re),
                ("BSFA 4-bit, every step", "as f32, plus the directions decoded on the device "
                 "(about 15 launches, 46 bytes moved per value) and the update encoded there "
                 "(about 70 launches)", b4[:re4], r.t_b4),
                ("BSFA 4-bit, every 10 steps", "history decoded and its whole Gram matrix, old "
                 "directions decoded, new directions encoded, on the device", b4[re4:],
                 r.t_b4_re)]:
            fl = sum(kn.flops for kn in ks) / 1e9
            gb = sum(kn.bytes for kn in ks) / 1e9
            calls = sum(kn.calls for kn in ks)
            print(f"| {name} | {what} | {fl:,.0f} | {gb:,.1f} | {fmt_ms(t)} | {calls:,} | |")
    host_micro = tot[3] * LAUNCH + r.host
    t_micro = r.micro_time()
    masks = f" + {fmt_ms(r.host)} ms of causal masks" if r.host else ""
    print(f"micro-batch: GPU {fmt_ms(tot[2])} ms, host {fmt_ms(host_micro)} ms "
          f"({tot[3]:,} launches at {LAUNCH * 1e6:.0f} us{masks}) -> {fmt_ms(t_micro)} ms")
    first = [kn for kn in r.micro if kn.first]  # zero-fills and the adds into them
    print(f"of which autograd zero-fill + add of first gradients: "
          f"{sum(kn.bytes for kn in first) / 1e9:.0f} GB, {fmt_ms(sum(kn.time for kn in first))} ms")
    return t_micro


def optimizer_times(r):
    """Time per optimizer step of each optimizer, on the tensor-op paths the code runs."""
    return {"AdamW": r.t_clip + r.t_adamw,
            "Adam-mini + BSFA f32": r.t_clip + r.t_mini + r.t_b32 + r.t_b32_re / BSFA_T,
            "Adam-mini + BSFA 4-bit": r.t_clip + r.t_mini + r.t_b4 + r.t_b4_re / BSFA_T}


def optimizer_times_now(r):
    """`optimizer_times` with the fused update and gradient norm the code has on CUDA
    (`fused.code_optimizer`); `r`'s BSFA is the CUDA path's (its projection batched)."""
    from .fused import code_optimizer
    mini = code_optimizer(True)
    return {"AdamW": code_optimizer(False),
            "Adam-mini + BSFA f32": mini + r.t_b32 + r.t_b32_re / BSFA_T,
            "Adam-mini + BSFA 4-bit": mini + r.t_b4 + r.t_b4_re / BSFA_T}


def steps(r, micro_t, opt_t):
    """The bench step (one micro-batch) and the preset's step (40 of them)."""
    bench = micro_t + opt_t
    preset = MICRO_PER_STEP * micro_t + (MICRO_PER_STEP - 1) * r.t_accum + opt_t
    return bench, preset


def mfu(r, tokens, secs):
    return r.flops_tok * tokens / secs / PEAK_BF16


def print_step_table(paths):
    """`paths`: (name, Run, optimizer times) of each code path; its micro-batch with each
    optimizer."""
    print()
    print("| path | optimizer | bench step (batch 12) | tokens/s | MFU | preset step (480 x 1024) "
          "| tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for path, r, opt in paths:
        for name, o in opt.items():
            s1, s40 = steps(r, r.micro_time(), o)
            print(f"| {path} | {name} | {fmt_ms(s1)} ms | {N / s1:,.0f} | "
                  f"{mfu(r, N, s1) * 100:.1f}% | {s40:.2f} s | {MICRO_PER_STEP * N / s40:,.0f} | "
                  f"{mfu(r, MICRO_PER_STEP * N, s40) * 100:.1f}% |")


# Memory (GiB: an "80 GB" H100 shows 81,559 MiB = 79.6 GiB in nvidia-smi), 5% of it left to
# allocator fragmentation.
DEVICE_BYTES = 81559 * 2**20
USABLE = DEVICE_BYTES * 0.95
RUNTIME = GIB                         # CUDA context, cuBLAS workspace


def state_bytes(r):
    """The optimizers' state: AdamW's moments, Adam-mini's, BSFA's f32 and 4-bit rows."""
    blocks_mini = sum(prod(sh) // (prod(sh) if nm == "norm" else mb)
                      for nm, sh, _, mb in param_shapes())
    covered = sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in BSFA_GROUPS)
    # 4-bit rows on the device: half a byte per value, a scale and a zero byte per 64 values
    return {"AdamW": 2 * r.param_bytes, "Adam-mini": r.param_bytes + 4 * blocks_mini,
            "BSFA f32": 4 * (BSFA_K + BSFA_L) * covered,
            "BSFA 4-bit": (0.5 + 2 / 64) * (BSFA_K + BSFA_L) * covered}


def fixed_bytes(r):
    """Per optimizer, the memory a run holds besides the micro-batch's: f32 parameters, the
    gradient accumulator, the optimizer's state, the runtime."""
    st, base = state_bytes(r), 2 * r.param_bytes + RUNTIME
    return {"AdamW": base + st["AdamW"],
            "Adam-mini + BSFA f32": base + st["Adam-mini"] + st["BSFA f32"],
            "Adam-mini + BSFA 4-bit": base + st["Adam-mini"] + st["BSFA 4-bit"]}


def planned_activations():
    """The micro-batch's peak after every fusion: about what the fused CPU path keeps
    (llama::activation_bytes without its vocabulary term, in bf16), the fused
    cross-entropy's own peak (cuda.ce_extra_bytes), gradients in flight."""
    return N * (12 * C + 3 * I) * L * 2 + ce_extra_bytes(LLAMA134M) + 2 * N * C * 4


def largest_micro_batch(fixed, act_peak):
    """The largest micro-batch dividing 480 whose peak fits USABLE, and that peak."""
    mb = int((USABLE - fixed) // (act_peak / B))
    while mb > 1 and 480 % mb:        # train.micro_batch_size must divide train.batch_size
        mb -= 1
    return mb, fixed + act_peak * mb / B


def print_memory(ref, now):
    param_bytes = ref.param_bytes
    fixed = fixed_bytes(ref)
    print()
    for name, r in (("reference path", ref), ("CUDA path now", now)):
        print(f"{name}: forward graph (activations kept for backward) {r.fwd_live / GIB:.1f} GiB; "
              f"peak during the backward {r.act_peak / GIB:.1f} GiB (gradient store included); "
              f"orphan gradients of untracked operands, held to the end: "
              f"{r.orphan_bytes / GIB:.1f} GiB")
    st = state_bytes(ref)
    print(f"parameters f32 {param_bytes / GIB:.2f} GiB; gradient accumulator {param_bytes / GIB:.2f} "
          f"GiB; AdamW moments {st['AdamW'] / GIB:.2f} GiB; Adam-mini {st['Adam-mini'] / GIB:.2f} "
          f"GiB; BSFA f32 state {st['BSFA f32'] / GIB:.1f} GiB (4-bit: {st['BSFA 4-bit'] / GIB:.1f} "
          f"GiB); runtime 1 GiB")
    print()
    print("| run | peak, reference path | CUDA path now | largest micro-batch dividing 480 now "
          "(5% margin) | after the fusions |")
    print("|---|---|---|---|---|")
    for name, f in fixed.items():
        p_ref, p_now = f + ref.act_peak, f + now.act_peak
        mb, at = largest_micro_batch(f, now.act_peak)
        print(f"| {name} | {p_ref / GIB:.1f} GiB ({fits(p_ref)}) | {p_now / GIB:.1f} GiB "
              f"({fits(p_now)}) | {mb} ({at / GIB:.1f} GiB) | "
              f"{(f + planned_activations()) / GIB:.1f} GiB |")


def fits(nbytes):
    return "fits" if nbytes <= USABLE else "does not fit"


def print_kernels(micro):
    """`--kernels`: every kernel class per phase and op group, longest first."""
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
