//! Fused CPU kernels of the optimizers.

use crate::cpu::{float_dispatch, owned, slice, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

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

/// One AdamW update of a parameter `p` with gradient `g * grad_scale` and moments `mv` (`2 x n`: first
/// moments, then second moments). The output packs `[p', m', v']` as `3 x n`.
pub struct AdamWUpdate {
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
}

impl CustomOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
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
        fn run<T: Elem>(p: &[T], g: &[T], mv: &[T], h: &AdamWUpdate) -> Vec<T> {
            let n = p.len();
            let c = |x: f64| T::from(x).expect("hyper-parameter fits the float type");
            let (b1, b2, eps) = (c(h.beta1), c(h.beta2), c(h.eps));
            let (keep, step) = (c(1.0 - h.decay), c(h.lr / h.bias1));
            let inv_bias2 = c(1.0 / h.bias2_sqrt);
            let (one_b1, one_b2) = (T::one() - b1, T::one() - b2);
            let scale = c(h.grad_scale);
            // Every element of the output is written below, so it is not zero-filled first
            // (a pass over 3x the parameters).
            let mut out: Vec<T> = Vec::with_capacity(3 * n);
            let spare = &mut out.spare_capacity_mut()[..3 * n];
            let (p_out, rest) = spare.split_at_mut(n);
            let (m_out, v_out) = rest.split_at_mut(n);
            let (m, v) = mv.split_at(n);
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
                        let v_new = b2 * v[j] + one_b2 * g * g;
                        mo[j].write(m_new);
                        vo[j].write(v_new);
                        po[j].write(p[j] * keep - step * m_new / (v_new.sqrt() * inv_bias2 + eps));
                    }
                });
            // SAFETY: the three chunked loops above wrote all 3n elements.
            unsafe { out.set_len(3 * n) };
            out
        }
        let n = pl.shape().elem_count();
        if gl.shape().elem_count() != n || ml.shape().elem_count() != 2 * n {
            bail!("adamw-update: parameter, gradient and moments sizes differ");
        }
        float_dispatch!(ps, self.name(), |T| Ok(owned(
            run::<T>(slice(ps, pl)?, slice(gs, gl)?, slice(ms, ml)?, self),
            &Shape::from((3, n))
        )))
    }
}
