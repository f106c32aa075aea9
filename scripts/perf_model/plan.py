"""The fused kernels of docs/gpu.md applied one by one, largest saving first: first those the
code has (simulated kernel by kernel, cuda.py), which together make the CUDA path as it is now,
then those still to write (costed in fused.py) on top of it. The bench and preset step times
after each, and the predictions `--json` prints."""
from .cuda import KERNELS
from .fused import code_optimizer, fmt_ms, fused_bsfa, fused_items, t_bw
from .hw import BSFA_T, GIB, HBM, LAUNCH, MICRO_PER_STEP, N, PEAK_BF16, SYNC, T, B
from .report import USABLE, DEVICE_BYTES, fixed_bytes, mfu, planned_activations, steps
from .simulate import Run

# The kernels the code has, as the table names them.
IMPLEMENTED = {
    "attention": "flash-attention fwd+bwd (Triton, FlashAttention-2): causal mask, GQA, scale, "
                 "RoPE on load, packed qkv read in place, deterministic backward; "
                 "**implemented** (`causal_attention.py`)",
    "cross_entropy": "fused linear + cross-entropy over row chunks (logits never whole, "
                     "gradients in the forward); **implemented**",
    "embedding": "embedding backward: one block per vocabulary row, no atomics "
                 "(deterministic); **implemented** (`embedding.cu`)",
    "rms_norm": "RMSNorm fwd+bwd (Triton, dw from per-block parts: deterministic); "
                "**implemented** (`rms_norm.py`)",
    "swiglu": "SwiGLU fwd+bwd on the packed gate/up output (Triton); **implemented** "
              "(`swiglu.py`)",
    "residual_rms_norm": "residual add + RMSNorm fwd+bwd (Triton: the sum and its norm in one "
                         "kernel, the stream's gradient added in the norm's dx pass through "
                         "the autograd patch's `bwd_accumulating`); **implemented** "
                         "(`rms_norm.py`)",
}
# Fusions outside the micro-batch's op groups, or of candle itself.
CODE_OPTIMIZER = ("fused AdamW / Adam-mini update and gradient norm as multi-tensor launches "
                  "(Triton: one in-place update launch over all parameters, one sum-of-squares "
                  "launch, one host read); **implemented** (`adam.py`)")
CODE_BSFA = ("BSFA's per-step projection over all blocks in three launches (Triton: update and "
             "`U v`, coordinates, `theta` in place; U read twice); **implemented** (`bsfa.py`)")
BSFA = ("BSFA: the update written to the history row by the projection kernel and no copy "
        "before the base step (16 B per value besides U), and its re-estimation's products "
        "fused")
PATCH = ("autograd: a tensor's first gradient moved in, not zero-filled and added, none for "
         "untracked operands (candle patch)")
# The optimizers the table and the predictions follow.
OPTS = ("AdamW", "Adam-mini + BSFA f32", "Adam-mini + BSFA 4-bit")


class Plan:
    """The fusions applied in order, from the reference path (`ref`) through the CUDA path
    now (`now`) to the end state; `rows` holds each step's label, saving, micro-batch time
    and optimizer times."""

    def __init__(self, ref, now, opt):
        self.ref, self.r = ref, now
        self.items = fused_items(now.micro)
        self.state = {"replaced": set(), "gpu": 0.0, "calls": 0, "gbytes": 0.0, "grads": 0,
                      "patched": True}   # the simulation runs the patched autograd
        self.opt = dict(opt)           # the code's optimizers
        self.opt_now = dict(opt)
        self.base_mini = ref.t_clip + ref.t_mini
        self.bsfa_now = {32: ref.t_b32 + ref.t_b32_re / BSFA_T, 4: ref.t_b4 + ref.t_b4_re / BSFA_T}
        self.fb = {bits: fused_bsfa(bits) for bits in (32, 4)}
        self.rows = []
        self.build()

    def micro_time(self, st):
        ks = [kn for kn in self.r.micro if kn.group not in st["replaced"]
              and not (st["patched"] and kn.first is True)]
        gpu = sum(kn.time * (2 / 3 if st["patched"] and kn.first == "copy" else 1)
                  for kn in ks) + st["gpu"]
        calls = sum(kn.calls for kn in ks) + st["calls"]
        if not st["patched"]:
            gpu += t_bw(4 * st["gbytes"])
            calls += 2 * st["grads"]
        return max(gpu, calls * LAUNCH + self.r.host) + SYNC, gpu, calls, ks

    def with_item(self, it):
        st, st2 = self.state, dict(self.state)
        st2["replaced"] = st["replaced"] | it.groups
        st2["gpu"] = st["gpu"] + it.gpu
        st2["calls"] = st["calls"] + it.calls
        st2["gbytes"] = st["gbytes"] + it.grad_bytes
        st2["grads"] = st["grads"] + it.grads
        return st2

    def saving(self, name, it, cur):
        """Per bench step, of applying `name` (`it`: its fused item, None for the others)."""
        if it is not None:
            return cur - self.micro_time(self.with_item(it))[0]
        if name == BSFA:
            return self.bsfa_now[32] - (self.fb[32][0] + self.fb[32][1] / BSFA_T)
        st2 = dict(self.state)
        st2["patched"] = True
        return cur - self.micro_time(st2)[0]

    def set_mini(self):
        for bits, name in ((32, "Adam-mini + BSFA f32"), (4, "Adam-mini + BSFA 4-bit")):
            self.opt_now[name] = self.base_mini + self.bsfa_now[bits]

    def apply(self, name, it, save):
        """Applies `name`; returns the saving's label."""
        if it is not None:
            self.state = self.with_item(it)
            return f"{fmt_ms(save)} ms"
        if name == BSFA:
            self.bsfa_now = {bits: s + re / BSFA_T for bits, (s, re) in self.fb.items()}
            self.set_mini()
            return f"{fmt_ms(save)} ms (BSFA)"
        self.state["patched"] = True
        return f"{fmt_ms(save)} ms"

    def add_row(self, label, saving, micro):
        self.rows.append((label, saving, micro, dict(self.opt_now)))

    def build(self):
        cur = Run(optimizer=False, patched=False).micro_time()
        self.add_row("reference ops, candle 0.11.1's autograd as released", "", cur)
        self.add_row("+ " + PATCH + "; **implemented** (`vendor/candle-core`): the reference "
                     "path (`train.kernels=reference`)",
                     f"{fmt_ms(cur - self.ref.micro_time())} ms", self.ref.micro_time())
        cur = self.ref.micro_time()
        # the kernels the code has, each simulated on top of those before it
        applied = set()
        while len(applied) < len(KERNELS):
            times = {k: Run(applied | {k}, optimizer=False).micro_time()
                     for k in KERNELS if k not in applied}
            best = min(times, key=times.get)
            applied.add(best)
            self.add_row("+ " + IMPLEMENTED[best], f"{fmt_ms(cur - times[best])} ms",
                         times[best])
            cur = times[best]
        assert abs(cur - self.r.micro_time()) < 1e-12, "the last row is the CUDA path now"
        # the fused optimizer the code has: multi-tensor launches over all parameters
        save = self.opt_now["AdamW"] - code_optimizer(False)
        self.opt_now["AdamW"] = code_optimizer(False)
        self.base_mini = code_optimizer(True)
        self.set_mini()
        self.add_row("+ " + CODE_OPTIMIZER, f"{fmt_ms(save)} ms (AdamW)", cur)
        # BSFA's batched projection the code has (the CUDA path's simulation)
        now_bsfa = {32: self.r.t_b32 + self.r.t_b32_re / BSFA_T,
                    4: self.r.t_b4 + self.r.t_b4_re / BSFA_T}
        save = self.bsfa_now[32] - now_bsfa[32]
        self.bsfa_now = now_bsfa
        self.set_mini()
        self.opt_code = dict(self.opt_now)
        self.add_row("+ " + CODE_BSFA, f"{fmt_ms(save)} ms (BSFA)", cur)
        self.rows.append(None)          # the CUDA path as it is now ends here
        pending = {it.name: it for it in self.items}
        pending[BSFA] = None
        while pending:
            cur = self.micro_time(self.state)[0]
            best, best_save = None, -1.0
            for name, it in pending.items():
                save = self.saving(name, it, cur)
                if save > best_save:
                    best, best_save = name, save
            label = self.apply(best, pending.pop(best), best_save)
            self.add_row("+ " + best, label, self.micro_time(self.state)[0])

    def print_table(self):
        r = self.r
        print()
        print("| after (cumulative) | saving per bench step | bench AdamW | bench Adam-mini + BSFA "
              "f32 | preset AdamW | preset Adam-mini + BSFA f32 |")
        print("|---|---|---|---|---|---|")
        for row in self.rows:
            if row is None:
                print("| **= the CUDA path now** (the row above); still to write, largest saving first: | | | | | |")
                continue
            label, saving, m, opt = row
            a1, a40 = steps(r, m, opt["AdamW"])
            b1, b40 = steps(r, m, opt["Adam-mini + BSFA f32"])
            print(f"| {label} | {saving} | {fmt_ms(a1)} ms, {mfu(r, N, a1) * 100:.1f}% "
                  f"| {fmt_ms(b1)} ms, {mfu(r, N, b1) * 100:.1f}% "
                  f"| {a40:.2f} s, {mfu(r, MICRO_PER_STEP * N, a40) * 100:.1f}% "
                  f"| {b40:.2f} s, {mfu(r, MICRO_PER_STEP * N, b40) * 100:.1f}% |")

    def print_end_state(self):
        m, gpu, calls, ks = self.micro_time(self.state)

        def group(g):
            return sum(kn.time for kn in ks if kn.group == g)

        gemm = sum(kn.time for kn in self.r.micro
                   if kn.group == "linear GEMMs" and kn.kind == "gemm")
        head = group("output head + cross-entropy")
        fa = group("attention (scores, softmax, heads)")
        print()
        print(f"fused end state per micro-batch: {fmt_ms(m)} ms: linear-layer GEMMs {fmt_ms(gemm)}, "
              f"output head + CE {fmt_ms(head)}, flash-attention {fmt_ms(fa)}, the rest "
              f"{fmt_ms(gpu - gemm - head - fa)} ms; {calls} launches ({fmt_ms(calls * LAUNCH)} ms "
              f"host)")
        (s32, re32), (s4, re4) = self.fb[32], self.fb[4]
        print(f"optimizer per step after fusion: AdamW {fmt_ms(self.opt_now['AdamW'])} ms; Adam-mini "
              f"+ BSFA f32 {fmt_ms(self.opt_now['Adam-mini + BSFA f32'])} ms (BSFA projection "
              f"{fmt_ms(s32)} ms, re-estimation {fmt_ms(re32)} ms every {BSFA_T} steps)")
        print(f"BSFA with 4-bit state kept on the device, decoded inside the kernels: projection "
              f"{fmt_ms(s4)} ms, re-estimation {fmt_ms(re4)} ms")

    def predictions(self):
        """The `--json` object (its schema: gpu_perf_model.py's docstring)."""
        r = self.r
        planned_m = self.micro_time(self.state)[0]
        fixed = fixed_bytes(r)
        paths = {"reference": (self.ref.micro_time(), self.opt, self.ref.act_peak),
                 "now": (r.micro_time(), self.opt_code, r.act_peak),
                 "planned": (planned_m, self.opt_now, planned_activations())}
        keys = {"AdamW": "adamw", "Adam-mini + BSFA f32": "adam_mini_bsfa_f32",
                "Adam-mini + BSFA 4-bit": "adam_mini_bsfa_4bit"}
        out = {
            "model": "llama134m",
            "dtype": "bf16",
            "gpu": {"name": "NVIDIA H100 SXM5 80 GB", "count": 1,
                    "peak_bf16_tflops": PEAK_BF16 / 1e12, "hbm_tb_per_s": HBM / 1e12,
                    "memory_gib": round(DEVICE_BYTES / GIB, 2),
                    "usable_gib": round(USABLE / GIB, 2)},
            "micro_batch": B,
            "seq_len": T,
            "micro_batches_per_preset_step": MICRO_PER_STEP,
            "model_flops_per_token": r.flops_tok,
            "now_kernels": sorted(r.kernels),
        }
        for path, (micro, opt, act) in paths.items():
            runs = {}
            for name, key in keys.items():
                peak = fixed[name] + act
                for kind, secs, tokens in zip(("bench", "preset"), steps(r, micro, opt[name]),
                                              (N, MICRO_PER_STEP * N)):
                    runs[f"{kind}_{key}"] = {
                        "tokens_per_step": tokens,
                        "ms_per_step": round(secs * 1e3, 3),
                        "tokens_per_s": round(tokens / secs),
                        "mfu_percent": round(mfu(r, tokens, secs) * 100, 2),
                        "peak_gib": round(peak / GIB, 2),
                        "fits_80gb": peak <= USABLE,
                    }
            out[path] = runs
        return out
