"""The figures the model runs on: the H100's datasheet, the assumed efficiencies, the model's
shapes (llama134m unless told otherwise) and the bytes per stored type."""

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
HOST_THREADS = 16       # host cores solving BSFA's eigenproblems in parallel (the lent H100 box's)
MASK_HOST = 1.5e-3      # causal_mask: 1M f32 built on one core, per layer and micro-batch

# The candle-core release whose graph and backprop.rs the model replays; the inventory check
# fails when Cargo.lock pins another one.
CANDLE = "0.11.1"


class Dims:
    """A LLaMA's shapes and one micro-batch's: batch B, sequence T, hidden C, heads H, key/value
    heads KV, intermediate I, vocabulary V, layers L."""

    def __init__(self, B, T, C, H, KV, I, V, L):
        self.B, self.T, self.C, self.H, self.KV, self.I, self.V, self.L = B, T, C, H, KV, I, V, L
        self.HD = C // H
        self.N = B * T


# --- Model: configs/llama134m.json ----------------------------------------------------------
LLAMA134M = Dims(B=12, T=1024, C=768, H=16, KV=16, I=3072, V=50304, L=6)
B, T, C, H, KV, I, V, L = (getattr(LLAMA134M, n) for n in ("B", "T", "C", "H", "KV", "I", "V", "L"))
HD, N = LLAMA134M.HD, LLAMA134M.N
MICRO_PER_STEP = 480 // 12   # train.batch_size / train.micro_batch_size of the preset
BSFA_K, BSFA_L, BSFA_T = 50, 60, 10
BSFA_GROUPS = ("norm", "attn", "mlp")   # the parameter groups BSFA covers (bsfa.blocks)

DB = {"f32": 4, "bf16": 2, "u32": 4, "f64": 8}
GIB = 2**30


def prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p
