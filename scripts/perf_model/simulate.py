"""One micro-batch of llama134m (forward, backward) and one optimizer step of each optimizer,
simulated: the kernels, times and memory the report prints."""
from .backward import backward
from .forward import forward, make_weights
from .fused import phase_time
from .hw import LAUNCH, LLAMA134M, SYNC, V, C, L, T, prod
from .optim import adam, bsfa, clip, grad_accumulate, param_shapes
from .sim import S


class Run:
    """What the simulation of llama134m yields: kernels per phase, times, memory. `kernels`:
    which of our CUDA kernels (cuda.KERNELS) the micro-batch runs; none is the reference
    path. `patched`: candle's autograd with our patch (false: candle 0.11.1 as released)."""

    def __init__(self, kernels=frozenset(), optimizer=True, patched=True):
        self.kernels = frozenset(kernels)
        # parameters: f32 masters on the device
        S.reset()
        S.patched = patched
        S.phase, S.group = "setup", "parameters"
        weights = make_weights(LLAMA134M)
        self.params = sum(prod(sh) for _, sh, _, _ in param_shapes())
        self.param_bytes = 4 * self.params
        assert S.live == self.param_bytes

        # one micro-batch: forward, then backward
        S.kernels = []
        S.kept.clear()
        loss = forward(LLAMA134M, weights, self.kernels)
        self.fwd_live = S.live - self.param_bytes
        _, self.orphan_bytes, _ = backward(loss)
        self.act_peak = S.peak - self.param_bytes
        self.micro = list(S.kernels)
        self.host = S.host      # host work besides launches: the causal masks
        self.kept = dict(S.kept)
        if optimizer:
            self.optimizer_kernels()
        self.nonembed = self.params - V * C
        self.flops_tok = 6 * self.nonembed + 12 * L * C * T

    def optimizer_kernels(self):
        def collect(fn, *a):
            S.kernels = []
            out = fn(*a)
            return list(S.kernels), out

        self.accum, _ = collect(grad_accumulate)
        self.clipk, _ = collect(clip)
        self.adamw_k, _ = collect(adam, lambda name, shape, mini: 1)
        self.mini_k, _ = collect(adam,
                                 lambda name, shape, mini: prod(shape) if name == "norm" else mini)
        # BSFA's projection batched where the micro-batch runs our kernels (the CUDA path)
        self.b32, (h32, self.re32) = collect(bsfa, 32, bool(self.kernels))
        self.b4, (h4, self.re4) = collect(bsfa, 4, bool(self.kernels))

        b32, b4, re32, re4 = self.b32, self.b4, self.re32, self.re4
        self.t_clip, self.t_accum = phase_time(self.clipk), phase_time(self.accum)
        self.t_adamw, self.t_mini = phase_time(self.adamw_k), phase_time(self.mini_k)
        self.t_b32 = phase_time(b32[:re32]) + h32[0]
        self.t_b32_re = phase_time(b32[re32:]) + h32[1]
        # 4-bit: host decoding, pageable copies and encoding run one after the other
        self.t_b4, self.t_b4_re = phase_time(b4[:re4]) + h4[0], phase_time(b4[re4:]) + h4[1]

    def micro_time(self):
        """One micro-batch: GPU and host overlap until the sync that ends it."""
        gpu = sum(kn.time for kn in self.micro)
        calls = sum(kn.calls for kn in self.micro)
        return max(gpu, calls * LAUNCH + self.host) + SYNC
