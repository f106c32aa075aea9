"""The tables of docs/gpu.md, printed from a simulated `Run` of llama134m."""
from collections import defaultdict

from .fused import fmt_ms, summarize
from .hw import (B, BSFA_GROUPS, BSFA_K, BSFA_L, BSFA_T, C, GIB, I, L, LAUNCH, MASK_HOST,
                 MICRO_PER_STEP, N, PEAK_BF16, SYNC, T, V, prod)
from .optim import param_shapes
from .sim import S

GROUPS = ["embedding", "RMSNorm", "linear GEMMs", "RoPE", "attention (scores, softmax, heads)",
          "SwiGLU (silu, product)", "residual adds", "output head + cross-entropy"]


def print_header(r):
    print(f"llama134m: {r.params:,} parameters ({r.nonembed:,} besides the input embedding); "
          f"micro-batch {B} x {T} = {N:,} tokens; model FLOPs/token = 6 N + 12 L C T = "
          f"{r.flops_tok / 1e6:.1f} M; per micro-batch {r.flops_tok * N / 1e12:.2f} TFLOP "
          f"({r.flops_tok * N / PEAK_BF16 * 1e3:.2f} ms at 989 TFLOP/s)")


def print_op_table(r):
    """Per op group of the micro-batch, then the optimizer rows; returns the micro-batch time."""
    summ = summarize(r.micro)
    print()
    print("| op | GFLOP | GB moved | ms (fwd + bwd) | launches | kept for bwd, GiB |")
    print("|---|---|---|---|---|---|")
    tot = [0, 0, 0, 0]
    for g in GROUPS:
        f, b = summ[("fwd", g)], summ[("bwd", g)]
        row = [f[i] + b[i] for i in range(4)]
        tot = [tot[i] + row[i] for i in range(4)]
        print(f"| {g} | {row[0] / 1e9:,.0f} | {row[1] / 1e9:,.1f} | {fmt_ms(row[2])} "
              f"({fmt_ms(f[2])} + {fmt_ms(b[2])}) | {row[3]:,} | {S.kept[g] / GIB:.1f} |")
    print(f"| micro-batch (fwd + bwd) | {tot[0] / 1e9:,.0f} | {tot[1] / 1e9:,.1f} | "
          f"{fmt_ms(tot[2])} | {tot[3]:,} | {r.fwd_live / GIB:.1f} |")
    b32, b4, re32, re4 = r.b32, r.b4, r.re32, r.re4
    for name, ks, t in [("gradient accumulation, per extra micro-batch", r.accum, r.t_accum),
                        ("clipping: global norm (one sync per tensor)", r.clipk, r.t_clip),
                        ("AdamW (tensor ops)", r.adamw_k, r.t_adamw),
                        ("Adam-mini (tensor ops)", r.mini_k, r.t_mini),
                        ("BSFA f32: projection, every step", b32[:re32], r.t_b32),
                        ("BSFA f32: re-estimation, every T = 10 steps", b32[re32:], r.t_b32_re),
                        ("BSFA 4-bit: projection, every step", b4[:re4], r.t_b4),
                        ("BSFA 4-bit: re-estimation, every T = 10 steps", b4[re4:], r.t_b4_re)]:
        fl = sum(kn.flops for kn in ks) / 1e9
        gb = sum(kn.bytes for kn in ks) / 1e9
        calls = sum(kn.calls for kn in ks)
        print(f"| {name} | {fl:,.0f} | {gb:,.1f} | {fmt_ms(t)} | {calls:,} | |")
    host_micro = tot[3] * LAUNCH + L * MASK_HOST
    t_micro = max(tot[2], host_micro) + SYNC
    print(f"micro-batch: GPU {fmt_ms(tot[2])} ms, host {fmt_ms(host_micro)} ms "
          f"({tot[3]:,} launches at {LAUNCH * 1e6:.0f} us + masks) -> {fmt_ms(t_micro)} ms")
    first = [kn for kn in r.micro if kn.first]  # zero-fills and the adds into them
    print(f"of which autograd zero-fill + add of first gradients: "
          f"{sum(kn.bytes for kn in first) / 1e9:.0f} GB, {fmt_ms(sum(kn.time for kn in first))} ms")
    return t_micro


def optimizer_times(r):
    """Time per optimizer step of each optimizer on the reference path."""
    return {"AdamW": r.t_clip + r.t_adamw,
            "Adam-mini + BSFA f32": r.t_clip + r.t_mini + r.t_b32 + r.t_b32_re / BSFA_T,
            "Adam-mini + BSFA 4-bit": r.t_clip + r.t_mini + r.t_b4 + r.t_b4_re / BSFA_T}


def steps(r, micro_t, opt_t):
    """The bench step (one micro-batch) and the preset's step (40 of them)."""
    bench = micro_t + opt_t
    preset = MICRO_PER_STEP * micro_t + (MICRO_PER_STEP - 1) * r.t_accum + opt_t
    return bench, preset


def mfu(r, tokens, secs):
    return r.flops_tok * tokens / secs / PEAK_BF16


def print_step_table(r, t_micro, opt):
    print()
    print("| reference path | bench step (batch 12) | tokens/s | MFU | preset step (480 x 1024) "
          "| tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, o in opt.items():
        s1, s40 = steps(r, t_micro, o)
        print(f"| {name} | {fmt_ms(s1)} ms | {N / s1:,.0f} | {mfu(r, N, s1) * 100:.1f}% | "
              f"{s40:.2f} s | {MICRO_PER_STEP * N / s40:,.0f} | "
              f"{mfu(r, MICRO_PER_STEP * N, s40) * 100:.1f}% |")


def print_memory(r):
    """Memory (GiB: an "80 GB" H100 shows 81,559 MiB = 79.6 GiB in nvidia-smi)."""
    param_bytes, act_peak = r.param_bytes, r.act_peak
    mom_adamw = 2 * param_bytes
    blocks_mini = sum(prod(sh) // (prod(sh) if nm == "norm" else mb)
                      for nm, sh, _, mb in param_shapes())
    mom_mini = param_bytes + 4 * blocks_mini
    covered = sum(prod(sh) for _, sh, grp, _ in param_shapes() if grp in BSFA_GROUPS)
    bsfa32_state = 4 * (BSFA_K + BSFA_L) * covered
    # 4-bit rows on the device: half a byte per value, a scale and a zero byte per 64 values
    bsfa4_state = (0.5 + 2 / 64) * (BSFA_K + BSFA_L) * covered
    runtime = GIB                     # CUDA context, cuBLAS workspace
    usable = 81559 * 2**20 * 0.95     # 5% left to allocator fragmentation
    print()
    print(f"forward graph (activations kept for backward): {r.fwd_live / GIB:.1f} GiB; peak during "
          f"the backward: {act_peak / GIB:.1f} GiB (gradient store included); orphan gradients of "
          f"untracked operands, held to the end: {r.orphan_bytes / GIB:.1f} GiB")
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
