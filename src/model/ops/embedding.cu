// The embedding's backward on CUDA, `dw[v] = sum over positions p with ids[p] == v of dy[p]`,
// without atomics, so that it is deterministic (candle's index_add kernel gives each of the
// `h` columns one thread that walks all `n` positions: `n` dependent steps).
//
// One block of 256 threads per vocabulary row `v`: the threads read the ids 256 at a time,
// warp ballots mark the positions holding `v`, and every thread adds those rows of `dy`, in
// position order, into its own columns of `dw[v]`. Each row is written by one block only.
//
// Layouts: ids `n` (u32), dy `n x h` (f32, row-major), dw `vocab x h` (f32, row-major);
// grid (vocab, 1, 1), block (256, 1, 1).
extern "C" __global__ void embedding_backward_f32(
    const unsigned int *ids, const float *dy, float *dw, unsigned int n, unsigned int h)
{
    __shared__ unsigned int hits[8];
    const unsigned int v = blockIdx.x;
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    float *out = dw + (size_t)v * h;
    for (unsigned int k = threadIdx.x; k < h; k += blockDim.x) {
        out[k] = 0.0f;
    }
    for (unsigned int tile = 0; tile < n; tile += 256u) {
        const unsigned int p = tile + threadIdx.x;
        const unsigned int mask = __ballot_sync(0xffffffffu, p < n && ids[p] == v);
        if (lane == 0) {
            hits[warp] = mask;
        }
        __syncthreads();
        for (unsigned int w = 0; w < 8u; ++w) {
            unsigned int m = hits[w];
            while (m != 0u) {
                const unsigned int bit = __ffs(m) - 1u;
                m &= m - 1u;
                const float *row = dy + (size_t)(tile + w * 32u + bit) * h;
                for (unsigned int k = threadIdx.x; k < h; k += blockDim.x) {
                    out[k] += row[k];
                }
            }
        }
        __syncthreads();
    }
}
