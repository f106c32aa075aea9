//! Fused CPU kernels for the ViT (LayerNorm, erf GELU, bias addition, bidirectional
//! attention), with hand-written backward passes.
//!
//! candle-nn's `layer_norm` has no backward, candle's own `gelu_erf` backward uses a
//! 6-digit constant for `1/sqrt(2 pi)`, too coarse for our finite-difference checks, and the
//! composed attention and bias gradients dominate a CPU step. These
//! kernels take contiguous f32/f64 CPU tensors; `vit_ops` dispatches here only then and
//! otherwise composes candle primitives, which all have exact backward passes.

use crate::cpu::{float_dispatch, last_dim, owned, slice, Elem};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// LayerNorm.

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as
/// `torch.nn.LayerNorm`).
pub struct LayerNorm {
    pub eps: f64,
}

/// Mean and `1 / sqrt(var + eps)` of one row.
fn moments<T: Elem>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from(x.len()).expect("row length fits the float type");
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = x
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    let eps = T::from(eps).expect("eps fits the float type");
    (mean, T::one() / (var + eps).sqrt())
}

fn check_row(name: &str, xl: &Layout, params: &Layout) -> Result<()> {
    if last_dim(xl) != params.shape().elem_count() {
        bail!(
            "{name}: weight has {} elements, rows have {}",
            params.shape().elem_count(),
            last_dim(xl)
        );
    }
    Ok(())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                let (mean, r) = moments(x, eps);
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * r * w + b;
                }
            });
            y
        }
        check_row(self.name(), xl, wl)?;
        check_row(self.name(), xl, bl)?;
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps),
            xl.shape()
        )))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &LayerNormGradInput { eps: self.eps })?;
        // One pass computes both parameter gradients, packed as two rows.
        let dwb = x.apply_op2_no_bwd(&dy, &LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// `dx = r * (g - mean(g) - xhat * mean(g * xhat))` per row, with `g = w * dy`.
struct LayerNormGradInput {
    eps: f64,
}

impl CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "layer-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let nt = T::from(n).expect("row length fits the float type");
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(n)
                .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
                .for_each(|(dx, (x, dy))| {
                    let (mean, r) = moments(x, eps);
                    let (mut sum_g, mut sum_gx) = (T::zero(), T::zero());
                    for ((&x, &d), &w) in x.iter().zip(dy).zip(w) {
                        let g = w * d;
                        sum_g += g;
                        sum_gx += g * (x - mean) * r;
                    }
                    let (mean_g, mean_gx) = (sum_g / nt, sum_gx / nt);
                    for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * (w * d - mean_g - (x - mean) * r * mean_gx);
                    }
                });
            dx
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(dys, dyl)?, self.eps),
            xl.shape()
        )))
    }
}

/// `[sum over rows of dy * xhat; sum over rows of dy]`, shape `2 x n`.
struct LayerNormGradParams {
    eps: f64,
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "layer-norm-grad-params"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T], n: usize, eps: f64) -> Vec<T> {
            // Fixed-size chunks summed in order: bitwise the same result for any thread
            // count (rayon's `reduce` tree is not).
            let chunk = 64 * n;
            let partials: Vec<Vec<T>> = x
                .par_chunks(chunk)
                .zip(dy.par_chunks(chunk))
                .map(|(x, dy)| {
                    let mut acc = vec![T::zero(); 2 * n];
                    let (dw, db) = acc.split_at_mut(n);
                    for (x, dy) in x.chunks(n).zip(dy.chunks(n)) {
                        let (mean, r) = moments(x, eps);
                        for (((dw, db), &x), &d) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy)
                        {
                            *dw += d * (x - mean) * r;
                            *db += d;
                        }
                    }
                    acc
                })
                .collect();
            let mut total = vec![T::zero(); 2 * n];
            for partial in partials {
                total.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
            }
            total
        }
        let n = last_dim(xl);
        let shape = Shape::from((2, n));
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?, n, self.eps),
            &shape
        )))
    }
}

// ---------------------------------------------------------------------------------------
// GELU (erf form, as `torch.nn.GELU()`).

/// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, elementwise.
pub struct Gelu;

fn erf<T: Elem>(x: T) -> T {
    use candle_core::cpu::erf::{erf_f32, erf_f64};
    // f32 goes through libm's erff: twice as fast, and exact to f32's precision.
    let x = WithDType::to_f64(x);
    let y = if T::DTYPE == candle_core::DType::F32 {
        erf_f32(x as f32) as f64
    } else {
        erf_f64(x)
    };
    T::from(y).expect("erf fits the float type")
}

fn gelu<T: Elem>(x: T) -> T {
    let half = T::from(0.5).expect("0.5 fits");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("constant fits");
    half * x * (T::one() + erf(x * inv_sqrt2))
}

/// `d gelu / dx = Phi(x) + x phi(x)`.
fn gelu_grad<T: Elem>(x: T) -> T {
    let half = T::from(0.5).expect("0.5 fits");
    let inv_sqrt2 = T::from(std::f64::consts::FRAC_1_SQRT_2).expect("constant fits");
    let inv_sqrt_2pi =
        T::from(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2)
            .expect("constant fits");
    half * (T::one() + erf(x * inv_sqrt2)) + x * inv_sqrt_2pi * (-half * x * x).exp()
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(4096)
                .zip(x.par_chunks(4096))
                .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x)));
            y
        }
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?),
            l.shape()
        )))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGrad)?))
    }
}

/// `dx = dy * gelu'(x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(4096)
                .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
                .for_each(|(dx, (x, dy))| {
                    for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dy) {
                        *dx = d * gelu_grad(x);
                    }
                });
            dx
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?),
            xl.shape()
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Bias addition.

/// `x + b` with `b` broadcast over the rows of `x` (its last dimension). candle's
/// broadcast-add backward reduces over the leading dimensions with a strided sum, the
/// slowest part of a ViT step on the CPU; this one sums rows in order.
pub struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], b: &[T]) -> Vec<T> {
            let mut y = x.to_vec();
            y.par_chunks_mut(b.len() * 64).for_each(|rows| {
                for row in rows.chunks_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
                }
            });
            y
        }
        check_row(self.name(), xl, bl)?;
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(bs, bl)?),
            xl.shape()
        )))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let db = dy.apply_op1_no_bwd(&SumRows { n: b.elem_count() })?;
        Ok((Some(dy), Some(db)))
    }
}

/// Sum of the rows of `n` elements of a contiguous tensor, in a fixed order.
struct SumRows {
    n: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], n: usize) -> Vec<T> {
            // Fixed-size chunks summed in order: the same bits for any thread count.
            let partials: Vec<Vec<T>> = x
                .par_chunks(64 * n)
                .map(|rows| {
                    let mut acc = vec![T::zero(); n];
                    for row in rows.chunks(n) {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect();
            let mut total = vec![T::zero(); n];
            for partial in partials {
                total.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
            }
            total
        }
        let shape = Shape::from(self.n);
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, self.n),
            &shape
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Bidirectional multi-head attention on the packed q|k|v projection.

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` on the calling thread; `lhs` and
/// `rhs` are given with their row and column strides, `dst` is row-major `m x n`.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: Elem + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the assertions above keep every strided access inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Softmax of each row of `n` elements, in place.
fn softmax_rows<T: Elem>(x: &mut [T], n: usize) {
    for row in x.chunks_mut(n) {
        let max = row
            .iter()
            .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m });
        let mut sum = T::zero();
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = T::one() / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One head's `q` (pre-scaled), `k`, `v` as contiguous `seq x dim` copies out of a batch
/// element's packed `seq x 3 hidden` rows.
fn gather_head<T: Elem>(
    qkv: &[T],
    (seq, hidden, dim): (usize, usize, usize),
    head: usize,
    scale: T,
) -> [Vec<T>; 3] {
    std::array::from_fn(|part| {
        let mut out = Vec::with_capacity(seq * dim);
        for t in 0..seq {
            let start = t * 3 * hidden + part * hidden + head * dim;
            let row = &qkv[start..start + dim];
            if part == 0 {
                out.extend(row.iter().map(|&v| v * scale));
            } else {
                out.extend_from_slice(row);
            }
        }
        out
    })
}

/// Softmax attention over every position (no mask) of the packed projection `qkv`
/// (`batch x seq x 3 hidden`: queries, keys, values, each `heads` heads wide), with queries
/// scaled by `1/sqrt(head_dim)`; output `batch x seq x hidden`. The backward recomputes the
/// attention probabilities instead of keeping them.
pub struct Attention {
    pub heads: usize,
}

impl Attention {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let dims = l.dims();
        let (batch, seq, width) = match dims {
            [b, s, w] => (*b, *s, *w),
            _ => bail!("vit-attention: expected batch x seq x 3 hidden, got {dims:?}"),
        };
        if !width.is_multiple_of(3 * self.heads) {
            bail!(
                "vit-attention: width {width} is not 3 x heads ({}) x head_dim",
                self.heads
            );
        }
        Ok((batch, seq, width / 3, width / 3 / self.heads))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "vit-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(
            qkv: &[T],
            (seq, hidden, dim): (usize, usize, usize),
            heads: usize,
        ) -> Vec<T> {
            let batch = qkv.len() / (seq * 3 * hidden);
            let scale = T::one() / T::from(dim).expect("dim fits").sqrt();
            let mut out = vec![T::zero(); batch * seq * hidden];
            out.par_chunks_mut(seq * hidden)
                .zip(qkv.par_chunks(seq * 3 * hidden))
                .for_each(|(out, qkv)| {
                    let mut p = vec![T::zero(); seq * seq];
                    let mut o = vec![T::zero(); seq * dim];
                    for h in 0..heads {
                        let [q, k, v] = gather_head(qkv, (seq, hidden, dim), h, scale);
                        gemm_into((seq, seq, dim), &mut p, false, (&q, dim, 1), (&k, 1, dim));
                        softmax_rows(&mut p, seq);
                        gemm_into((seq, dim, seq), &mut o, false, (&p, seq, 1), (&v, dim, 1));
                        for t in 0..seq {
                            out[t * hidden + h * dim..][..dim]
                                .copy_from_slice(&o[t * dim..][..dim]);
                        }
                    }
                });
            out
        }
        let (batch, seq, hidden, dim) = self.dims(l)?;
        let shape = Shape::from((batch, seq, hidden));
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, (seq, hidden, dim), self.heads),
            &shape
        )))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, d_out: &Tensor) -> Result<Option<Tensor>> {
        let grad =
            qkv.apply_op2_no_bwd(&d_out.contiguous()?, &AttentionGrad { heads: self.heads })?;
        Ok(Some(grad))
    }
}

/// The gradient of [`Attention`] with respect to its packed input.
struct AttentionGrad {
    heads: usize,
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "vit-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        /// Per head: `P = softmax(q k^T)`, `dV = P^T dO`, `dP = dO V^T`,
        /// `dS = P * (dP - rowsum(P * dP))`, `dq = scale dS K`, `dK = dS^T (scale q)`.
        fn run<T: Elem + 'static>(
            qkv: &[T],
            d_out: &[T],
            (seq, hidden, dim): (usize, usize, usize),
            heads: usize,
        ) -> Vec<T> {
            let scale = T::one() / T::from(dim).expect("dim fits").sqrt();
            let mut grad = vec![T::zero(); qkv.len()];
            grad.par_chunks_mut(seq * 3 * hidden)
                .zip(
                    qkv.par_chunks(seq * 3 * hidden)
                        .zip(d_out.par_chunks(seq * hidden)),
                )
                .for_each(|(grad, (qkv, d_out))| {
                    let mut p = vec![T::zero(); seq * seq];
                    let mut dp = vec![T::zero(); seq * seq];
                    let mut buf = vec![T::zero(); seq * dim];
                    for h in 0..heads {
                        let [q, k, v] = gather_head(qkv, (seq, hidden, dim), h, scale);
                        let mut d_o = Vec::with_capacity(seq * dim);
                        for t in 0..seq {
                            d_o.extend_from_slice(&d_out[t * hidden + h * dim..][..dim]);
                        }
                        gemm_into((seq, seq, dim), &mut p, false, (&q, dim, 1), (&k, 1, dim));
                        softmax_rows(&mut p, seq);
                        let mut scatter = |part: usize, values: &[T], factor: T| {
                            for t in 0..seq {
                                let dst =
                                    &mut grad[t * 3 * hidden + part * hidden + h * dim..][..dim];
                                for (d, &v) in dst.iter_mut().zip(&values[t * dim..][..dim]) {
                                    *d = v * factor;
                                }
                            }
                        };
                        // dV = P^T dO.
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&p, 1, seq),
                            (&d_o, dim, 1),
                        );
                        scatter(2, &buf, T::one());
                        // dP = dO V^T, then dS in place.
                        gemm_into(
                            (seq, seq, dim),
                            &mut dp,
                            false,
                            (&d_o, dim, 1),
                            (&v, 1, dim),
                        );
                        for (ds, p) in dp.chunks_mut(seq).zip(p.chunks(seq)) {
                            let dot = ds.iter().zip(p).fold(T::zero(), |a, (&d, &p)| a + d * p);
                            ds.iter_mut().zip(p).for_each(|(d, &p)| *d = p * (*d - dot));
                        }
                        // dq = scale dS K (q was scaled before the product).
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&dp, seq, 1),
                            (&k, dim, 1),
                        );
                        scatter(0, &buf, scale);
                        // dK = dS^T (scale q).
                        gemm_into(
                            (seq, dim, seq),
                            &mut buf,
                            false,
                            (&dp, 1, seq),
                            (&q, dim, 1),
                        );
                        scatter(1, &buf, T::one());
                    }
                });
            grad
        }
        let (_, seq, hidden, dim) = Attention { heads: self.heads }.dims(l)?;
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, slice(ds, dl)?, (seq, hidden, dim), self.heads),
            l.shape()
        )))
    }
}
