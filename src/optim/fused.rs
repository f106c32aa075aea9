//! Fused CPU kernels of the optimizers (one parameter per op), and on CUDA the same update and
//! sum of squares as multi-tensor Triton kernels over every parameter at once (`fused_cuda.rs`,
//! f32).

use crate::cpu_kernels::{float_dispatch, owned, slice, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
#[path = "fused_cuda.rs"]
mod cuda;

/// The reference the multi-tensor update on a GPU is checked against: the update with tensor ops,
/// returning the new parameter (flat) and moments.
#[cfg(feature = "cuda")]
pub(super) type UpdateReference<'a> =
    &'a dyn Fn(
        &candle_core::Tensor,
        &candle_core::Tensor,
        &candle_core::Tensor,
        &AdamUpdate,
    ) -> anyhow::Result<(candle_core::Tensor, candle_core::Tensor)>;

#[cfg(feature = "cuda")]
pub(super) use cuda::{gpu_sum_of_squares, gpu_update_all, Group};

/// Sum of squares of all elements, accumulated in f64 (a `()`-shaped f64 tensor).
pub struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T]) -> f64 {
            // Chunk sums added in order: deterministic whatever the thread scheduling.
            let partials: Vec<f64> = x
                .par_chunks(1 << 14)
                .map(|c| {
                    c.iter()
                        .map(|v| v.to_f64().map_or(f64::NAN, |v| v * v))
                        .sum::<f64>()
                })
                .collect();
            partials.into_iter().sum()
        }
        float_dispatch!(s, self.name(), |T| Ok((
            CpuStorage::F64(vec![run::<T>(slice(s, l)?)]),
            Shape::from(())
        )))
    }
}

/// Sum of squares with eight independent accumulators: a single running sum is one long
/// chain of dependent additions, which the CPU cannot overlap or vectorise. The fixed lane
/// order keeps the result deterministic.
fn sum_of_squares<T: Elem>(x: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    let mut total = tail.iter().fold(T::zero(), |a, &v| a + v * v);
    for lane in lanes {
        total += lane;
    }
    total
}

/// One Adam update of a parameter `p` with gradient `g * grad_scale`, where each block of
/// `block` consecutive elements shares one second moment: `block = 1` is AdamW, larger
/// blocks are Adam-mini. `moments` packs `[m (n) | v (n / block)]`; the output packs
/// `[p' (n) | m' (n) | v' (n / block)]`.
pub struct AdamUpdate {
    pub lr: f64,
    /// Multiplies the gradient first (gradient clipping).
    pub grad_scale: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `lr * weight_decay`, or 0 for parameters without decay.
    pub decay: f64,
    /// `1 - beta1^t`.
    pub bias1: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f64,
    /// Elements sharing one second moment.
    pub block: usize,
}

impl CustomOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(p: &[T], g: &[T], moments: &[T], h: &AdamUpdate) -> Vec<T> {
            let (n, block) = (p.len(), h.block);
            let blocks = n / block;
            let c = |x: f64| T::from(x).expect("hyper-parameter fits the float type");
            let (b1, b2, eps) = (c(h.beta1), c(h.beta2), c(h.eps));
            let (keep, step) = (c(1.0 - h.decay), c(h.lr / h.bias1));
            let (inv_bias2, scale) = (c(1.0 / h.bias2_sqrt), c(h.grad_scale));
            let (one_b1, one_b2) = (T::one() - b1, T::one() - b2);
            let inv_block = c(1.0 / block as f64);
            // Every element of the output is written below, so it is not zero-filled first
            // (a pass over 2-3x the parameters).
            let mut out: Vec<T> = Vec::with_capacity(2 * n + blocks);
            let spare = &mut out.spare_capacity_mut()[..2 * n + blocks];
            let (p_out, rest) = spare.split_at_mut(n);
            let (m_out, v_out) = rest.split_at_mut(n);
            let (m, v) = moments.split_at(n);
            if block == 1 {
                // AdamW: a flat loop the compiler vectorises (the blocked one below does
                // not, and took 2-3x as long on `llama72m`).
                const CHUNK: usize = 1 << 14;
                p_out
                    .par_chunks_mut(CHUNK)
                    .zip(m_out.par_chunks_mut(CHUNK).zip(v_out.par_chunks_mut(CHUNK)))
                    .enumerate()
                    .for_each(|(i, (po, (mo, vo)))| {
                        let r = i * CHUNK..(i * CHUNK + po.len());
                        let (p, g, m, v) = (&p[r.clone()], &g[r.clone()], &m[r.clone()], &v[r]);
                        for j in 0..po.len() {
                            let g = g[j] * scale;
                            let m_new = b1 * m[j] + one_b1 * g;
                            let v_new = b2 * v[j] + one_b2 * (g * g);
                            mo[j].write(m_new);
                            vo[j].write(v_new);
                            po[j].write(
                                p[j] * keep - step * m_new / (v_new.sqrt() * inv_bias2 + eps),
                            );
                        }
                    });
            } else {
                // Whole blocks per task, at least ~16k elements each.
                let per_task = (1usize << 14).div_ceil(block).max(1);
                p_out
                    .par_chunks_mut(per_task * block)
                    .zip(m_out.par_chunks_mut(per_task * block))
                    .zip(v_out.par_chunks_mut(per_task))
                    .enumerate()
                    .for_each(|(task, ((po, mo), vo))| {
                        let start = task * per_task * block;
                        for (b, vo) in vo.iter_mut().enumerate() {
                            let r = start + b * block..start + (b + 1) * block;
                            let (p, g, m) = (&p[r.clone()], &g[r.clone()], &m[r.clone()]);
                            let local = b * block..(b + 1) * block;
                            let (po, mo) = (&mut po[local.clone()], &mut mo[local]);
                            let sum_sq = sum_of_squares(g) * (scale * scale);
                            let v_new = b2 * v[task * per_task + b] + one_b2 * (sum_sq * inv_block);
                            vo.write(v_new);
                            // One division per block; the element loop only multiplies.
                            let rate = step / (v_new.sqrt() * inv_bias2 + eps);
                            for j in 0..block {
                                let m_new = b1 * m[j] + one_b1 * (g[j] * scale);
                                mo[j].write(m_new);
                                po[j].write(p[j] * keep - rate * m_new);
                            }
                        }
                    });
            }
            // SAFETY: either loop above wrote every p, m and v.
            unsafe { out.set_len(2 * n + blocks) };
            out
        }
        let n = pl.shape().elem_count();
        let block = self.block;
        if block == 0 || !n.is_multiple_of(block) {
            bail!("adam-update: {n} elements do not split into blocks of {block}");
        }
        if gl.shape().elem_count() != n || ml.shape().elem_count() != n + n / block {
            bail!("adam-update: parameter, gradient and moments sizes differ");
        }
        float_dispatch!(ps, self.name(), |T| Ok(owned(
            run::<T>(slice(ps, pl)?, slice(gs, gl)?, slice(ms, ml)?, self),
            &Shape::from(2 * n + n / block)
        )))
    }
}
