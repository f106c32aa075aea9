"""The fused kernels of docs/gpu.md applied one by one to the reference path, largest saving
first, with the bench and preset step times after each."""
from .fused import fmt_ms, fused_bsfa, fused_items, fused_optimizer, t_bw
from .hw import BSFA_T, L, LAUNCH, MASK_HOST, MICRO_PER_STEP, N, SYNC
from .report import mfu, steps

# Fusions outside the micro-batch's op groups, or of candle itself.
OPTIMIZER = "fused AdamW / Adam-mini and gradient norm (multi-tensor apply, one sync)"
BSFA = "BSFA projection and re-estimation as batched GEMMs (state on the device)"
PATCH = ("autograd: a tensor's first gradient moved in, not zero-filled and added "
         "(candle patch)")


class Plan:
    """The state after the fusions applied so far."""

    def __init__(self, r, opt):
        self.r = r
        self.items = fused_items(r.micro)
        self.state = {"replaced": set(), "gpu": 0.0, "calls": 0, "gbytes": 0.0, "grads": 0,
                      "patched": False}
        self.opt_now = {"AdamW": opt["AdamW"],
                        "Adam-mini + BSFA f32": opt["Adam-mini + BSFA f32"]}
        self.base_mini = r.t_clip + r.t_mini
        self.bsfa_now = r.t_b32 + r.t_b32_re / BSFA_T
        self.fb_step, self.fb_re = fused_bsfa(32)

    def micro_time(self, st):
        ks = [kn for kn in self.r.micro if kn.group not in st["replaced"]
              and not (st["patched"] and kn.first is True)]
        gpu = sum(kn.time * (2 / 3 if st["patched"] and kn.first == "copy" else 1)
                  for kn in ks) + st["gpu"]
        calls = sum(kn.calls for kn in ks) + st["calls"]
        if not st["patched"]:
            gpu += t_bw(4 * st["gbytes"])
            calls += 2 * st["grads"]
        mask = 0 if "attention (scores, softmax, heads)" in st["replaced"] else L * MASK_HOST
        return max(gpu, calls * LAUNCH + mask) + SYNC, gpu, calls

    def with_item(self, it):
        st, st2 = self.state, dict(self.state)
        st2["replaced"] = st["replaced"] | it.groups
        st2["gpu"] = st["gpu"] + it.gpu
        st2["calls"] = st["calls"] + it.calls
        st2["gbytes"] = st["gbytes"] + it.grad_bytes
        st2["grads"] = st["grads"] + it.grads
        return st2

    def row(self, label, saving):
        r, m = self.r, self.micro_time(self.state)[0]
        a1, a40 = steps(r, m, self.opt_now["AdamW"])
        b1, b40 = steps(r, m, self.opt_now["Adam-mini + BSFA f32"])
        print(f"| {label} | {saving} | {fmt_ms(a1)} ms, {mfu(r, N, a1) * 100:.1f}% "
              f"| {fmt_ms(b1)} ms, {mfu(r, N, b1) * 100:.1f}% "
              f"| {a40:.2f} s, {mfu(r, MICRO_PER_STEP * N, a40) * 100:.1f}% "
              f"| {b40:.2f} s, {mfu(r, MICRO_PER_STEP * N, b40) * 100:.1f}% |")

    def saving(self, name, it, cur):
        """Per bench step, of applying `name` (`it`: its fused item, None for the others)."""
        if it is not None:
            return cur - self.micro_time(self.with_item(it))[0]
        if name == OPTIMIZER:
            return self.opt_now["AdamW"] - fused_optimizer(False)
        if name == BSFA:
            return self.bsfa_now - (self.fb_step + self.fb_re / BSFA_T)
        st2 = dict(self.state)
        st2["patched"] = True
        return cur - self.micro_time(st2)[0]

    def apply(self, name, it, save):
        """Applies `name`; returns the saving's label."""
        if it is not None:
            self.state = self.with_item(it)
            return f"{fmt_ms(save)} ms"
        if name == OPTIMIZER:
            self.opt_now["AdamW"] = fused_optimizer(False)
            self.base_mini = fused_optimizer(True)
            self.opt_now["Adam-mini + BSFA f32"] = self.base_mini + self.bsfa_now
            return f"{fmt_ms(save)} ms (AdamW)"
        if name == BSFA:
            self.bsfa_now = self.fb_step + self.fb_re / BSFA_T
            self.opt_now["Adam-mini + BSFA f32"] = self.base_mini + self.bsfa_now
            return f"{fmt_ms(save)} ms (BSFA)"
        self.state["patched"] = True
        return f"{fmt_ms(save)} ms"

    def print_table(self):
        print()
        print("| after (cumulative) | saving per bench step | bench AdamW | bench Adam-mini + BSFA "
              "f32 | preset AdamW | preset Adam-mini + BSFA f32 |")
        print("|---|---|---|---|---|---|")
        self.row("reference path (today)", "")
        pending = {it.name: it for it in self.items}
        pending.update({e: None for e in (OPTIMIZER, BSFA, PATCH)})
        while pending:
            cur = self.micro_time(self.state)[0]
            best, best_save = None, -1.0
            for name, it in pending.items():
                save = self.saving(name, it, cur)
                if save > best_save:
                    best, best_save = name, save
            label = self.apply(best, pending.pop(best), best_save)
            self.row("+ " + best, label)

    def print_end_state(self):
        m, gpu, calls = self.micro_time(self.state)
        micro, items = self.r.micro, self.items
        gemm = sum(kn.time for kn in micro if kn.group == "linear GEMMs" and kn.kind == "gemm")
        head = [it for it in items if it.name.startswith("fused linear")][0].gpu
        fa = [it for it in items if it.name.startswith("flash")][0].gpu
        print()
        print(f"fused end state per micro-batch: {fmt_ms(m)} ms: linear-layer GEMMs {fmt_ms(gemm)}, "
              f"output head + CE {fmt_ms(head)}, flash-attention {fmt_ms(fa)}, the rest "
              f"{fmt_ms(gpu - gemm - head - fa)} ms; {calls} launches ({fmt_ms(calls * LAUNCH)} ms "
              f"host)")
        print(f"optimizer per step after fusion: AdamW {fmt_ms(self.opt_now['AdamW'])} ms; Adam-mini "
              f"+ BSFA f32 {fmt_ms(self.opt_now['Adam-mini + BSFA f32'])} ms (BSFA projection "
              f"{fmt_ms(self.fb_step)} ms, re-estimation {fmt_ms(self.fb_re)} ms every {BSFA_T} steps)")
        f4_step, f4_re = fused_bsfa(4)
        print(f"BSFA with 4-bit state kept on the device, decoded inside the kernels: projection "
              f"{fmt_ms(f4_step)} ms, re-estimation {fmt_ms(f4_re)} ms")
