//! Fused CPU kernels with hand-written backward passes.
//!
//! Each op replaces a chain of candle primitives by one pass over memory, and its backward
//! by one more: fewer tensors allocated, zero-filled and summed per step. Inputs must be
//! contiguous f32 or f64 on the CPU; `ops` dispatches here only then, and falls back to the
//! composed primitives elsewhere. Every op is checked against finite differences and
//! against its composed twin in the tests.

use crate::cpu::{float_dispatch, last_dim, owned, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor,
    WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------
// RMSNorm.

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub struct RmsNorm {
    pub eps: f64,
}

fn inv_rms<T: Elem>(x: &[T], eps: f64) -> T {
    let n = T::from(x.len()).expect("row length fits the float type");
    let ms = x.iter().fold(T::zero(), |a, &v| a + v * v) / n;
    T::one() / (ms + T::from(eps).expect("eps fits the float type")).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
            let n = w.len();
            let mut y = vec![T::zero(); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
                let r = inv_rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
            y
        }
        if last_dim(xl) != wl.shape().elem_count() {
            bail!(
                "rms-norm: weight has {} elements, rows have {}",
                wl.shape().elem_count(),
                last_dim(xl)
            );
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(ws, wl)?, self.eps),
            xl.shape()
        )))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormGradInput { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&dy, &RmsNormGradWeight { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = r * (w*dy) - x * r^3 * sum(w*dy*x) / n` per row, with `r = 1/rms(x)`.
struct RmsNormGradInput {
    eps: f64,
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "rms-norm-grad-input"
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
                    let r = inv_rms(x, eps);
                    let dot = x
                        .iter()
                        .zip(dy)
                        .zip(w)
                        .fold(T::zero(), |a, ((&x, &d), &w)| a + w * d * x);
                    let c = r * r * r * dot / nt;
                    for (((dx, &x), &d), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        *dx = r * w * d - x * c;
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

/// `dw = sum over rows of dy * x * r`.
struct RmsNormGradWeight {
    eps: f64,
}

impl CustomOp2 for RmsNormGradWeight {
    fn name(&self) -> &'static str {
        "rms-norm-grad-weight"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(x: &[T], dy: &[T], n: usize, eps: f64) -> Vec<T> {
            // Fixed-size chunks summed in order: the result is bitwise the same for any
            // thread count and scheduling (rayon's `reduce` tree is not).
            let chunk = 64 * n;
            let partials: Vec<Vec<T>> = x
                .par_chunks(chunk)
                .zip(dy.par_chunks(chunk))
                .map(|(x, dy)| {
                    let mut acc = vec![T::zero(); n];
                    for (x, dy) in x.chunks(n).zip(dy.chunks(n)) {
                        let r = inv_rms(x, eps);
                        for ((a, &x), &d) in acc.iter_mut().zip(x).zip(dy) {
                            *a += d * x * r;
                        }
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
        let n = last_dim(xl);
        let shape = Shape::from(n);
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(slice(xs, xl)?, slice(dys, dyl)?, n, self.eps),
            &shape
        )))
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU gate on the packed output of the gate and up projections.

/// `silu(gate) * up` for `gu` of shape `... x (2 * inter)`, each row holding the gate
/// projection then the up projection (one linear layer computes both).
pub struct Swiglu;

fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(gu: &[T], inter: usize) -> Vec<T> {
            let mut y = vec![T::zero(); gu.len() / 2];
            y.par_chunks_mut(inter)
                .zip(gu.par_chunks(2 * inter))
                .for_each(|(y, gu)| {
                    let (g, u) = gu.split_at(inter);
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g * sigmoid(g) * u;
                    }
                });
            y
        }
        let width = last_dim(l);
        if !width.is_multiple_of(2) {
            bail!("swiglu: packed width {width} is odd");
        }
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("has a last dim") = width / 2;
        let shape = Shape::from(dims);
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(slice(s, l)?, width / 2),
            &shape
        )))
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            gu.detach()
                .apply_op2_no_bwd(&dy.contiguous()?, &SwigluGrad)?,
        ))
    }
}

/// Packed `[d/dgate | d/dup]` per row: `dy * up * s * (1 + g * (1 - s))` and `dy * g * s`,
/// with `s = sigmoid(g)`.
struct SwigluGrad;

impl CustomOp2 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gus: &CpuStorage,
        gul: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(gu: &[T], dy: &[T], inter: usize) -> Vec<T> {
            let mut d = vec![T::zero(); gu.len()];
            d.par_chunks_mut(2 * inter)
                .zip(gu.par_chunks(2 * inter).zip(dy.par_chunks(inter)))
                .for_each(|(d, (gu, dy))| {
                    let (g, u) = gu.split_at(inter);
                    let (dg, du) = d.split_at_mut(inter);
                    for j in 0..inter {
                        let s = sigmoid(g[j]);
                        dg[j] = dy[j] * u[j] * s * (T::one() + g[j] * (T::one() - s));
                        du[j] = dy[j] * g[j] * s;
                    }
                });
            d
        }
        float_dispatch!(gus, self.name(), |T| Ok(owned(
            run::<T>(slice(gus, gul)?, slice(dys, dyl)?, last_dim(dyl)),
            gul.shape()
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Linear layer without bias.

/// `x (rows x inp) @ w^T` for `w` of shape `out x inp`, on all of candle's threads; `w` is
/// read transposed in place.
fn x_times_w_t<T: Elem + 'static>(x: &[T], w: &[T], rows: usize, inp: usize, out: usize) -> Vec<T> {
    let mut y = vec![T::zero(); rows * out];
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides describe x (rows x inp, row-major), w read as its transpose
    // (inp x out) and y (rows x out, row-major), all within the slices.
    unsafe {
        gemm::gemm(
            rows,
            out,
            inp,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
            inp as isize,
            1,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    };
    y
}

/// `x @ w^T` over the last dimension of `x` (`w` is `out x in`, as in `torch.nn.Linear`).
///
/// As candle primitives a linear layer is a reshape, a transpose and a matmul, and the
/// backward pass zero-fills and sums a gradient for each of them (the transposed one with
/// strided, unvectorised indexing). Here the forward is one gemm reading `w` transposed
/// in place, and the backward two matmuls with contiguous results.
pub struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = match wl.dims() {
            [out, inp] => (*out, *inp),
            dims => bail!("linear: weight must be 2-d, got {dims:?}"),
        };
        if last_dim(xl) != inp {
            bail!(
                "linear: input rows have {} features, the weight expects {inp}",
                last_dim(xl)
            );
        }
        let rows = xl.shape().elem_count() / inp;
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("checked above") = out;
        let shape = Shape::from(dims);
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            x_times_w_t::<T>(slice(xs, xl)?, slice(ws, wl)?, rows, inp, out),
            &shape
        )))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached inputs: the backward products need no graph of their own.
        let (x, w) = (x.detach(), w.detach());
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp;
        let dy = dy.contiguous()?.reshape((rows, out))?;
        let dx = dy.matmul(&w)?.reshape(x.shape())?;
        let dw = dy.t()?.matmul(&x.reshape((rows, inp))?)?;
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------------------------------
// Causal self-attention with rotary embeddings, on the packed q|k|v projection.

/// A pointer that tasks on other threads may write through; each task writes only its
/// own disjoint (batch, head) region.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: the attention kernels hand each task a disjoint set of strided rows.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer. A method, so closures capture the `Send` wrapper, not its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` on the calling thread, each operand
/// given by its pointer, row stride and column stride (in elements).
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes.
unsafe fn small_gemm<T: Elem + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
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

/// Causal softmax of each row of a `seq x seq` score matrix, in place.
fn causal_softmax_rows<T: Elem>(scores: &mut [T], seq: usize) {
    for (i, row) in scores.chunks_mut(seq).enumerate() {
        let (visible, hidden) = row.split_at_mut(i + 1);
        let max = visible
            .iter()
            .fold(T::neg_infinity(), |m, &v| Float::max(m, v));
        let mut sum = T::zero();
        for v in visible.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = T::one() / sum;
        visible.iter_mut().for_each(|v| *v *= inv);
        hidden.iter_mut().for_each(|v| *v = T::zero());
    }
}

/// Query rows are processed in blocks of this many: a block multiplies only against the
/// keys at or before its last row, skipping most of the masked upper triangle.
const ROW_BLOCK: usize = 64;

/// Row blocks `(first, end)` of a `seq`-long sequence.
fn row_blocks(seq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq)
        .step_by(ROW_BLOCK)
        .map(move |first| (first, (first + ROW_BLOCK).min(seq)))
}

/// A row-major matrix operand: pointer to its first element and row stride.
type Rows<T> = (*const T, usize);
/// A row-major matrix destination: pointer to its first element and row stride.
type RowsMut<T> = (*mut T, usize);

/// `probs = causal_softmax(q k^T)` for one head, row block by row block.
///
/// # Safety
/// `q` and `k` must address `seq` rows of `dim` elements at their strides.
unsafe fn head_probs<T: Elem + 'static>(
    probs: &mut [T],
    (seq, dim): (usize, usize),
    q: Rows<T>,
    k: Rows<T>,
) {
    for (i0, i1) in row_blocks(seq) {
        let q_block = (q.0.add(i0 * q.1), q.1, 1);
        let k_t = (k.0, 1, k.1);
        small_gemm(
            (i1 - i0, i1, dim),
            probs.as_mut_ptr().add(i0 * seq),
            seq,
            false,
            q_block,
            k_t,
        );
    }
    causal_softmax_rows(probs, seq);
}

/// One head's forward pass: `out = causal_softmax(q k^T) v`.
///
/// # Safety
/// Every pointer must address `seq` rows of `dim` elements at its stride.
unsafe fn head_forward<T: Elem + 'static>(
    probs: &mut [T],
    (seq, dim): (usize, usize),
    (q, k, v): (Rows<T>, Rows<T>, Rows<T>),
    out: RowsMut<T>,
) {
    head_probs(probs, (seq, dim), q, k);
    for (i0, i1) in row_blocks(seq) {
        let p = (probs.as_ptr().add(i0 * seq), seq, 1);
        small_gemm(
            (i1 - i0, dim, i1),
            out.0.add(i0 * out.1),
            out.1,
            false,
            p,
            (v.0, v.1, 1),
        );
    }
}

/// One head's backward pass: recompute `P`, then per row block `dV += P^T dO`,
/// `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K`, `dK += dS^T Q`.
///
/// # Safety
/// Every pointer must address `seq` rows of `dim` elements at its stride.
unsafe fn head_backward<T: Elem + 'static>(
    (p, dp): (&mut [T], &mut [T]),
    (seq, dim): (usize, usize),
    (q, k, v, d_out): (Rows<T>, Rows<T>, Rows<T>, Rows<T>),
    (dq, dk, dv): (RowsMut<T>, RowsMut<T>, RowsMut<T>),
) {
    head_probs(p, (seq, dim), q, k);
    for (i0, i1) in row_blocks(seq) {
        let m = i1 - i0;
        let p_t = (p.as_ptr().add(i0 * seq), 1, seq);
        let d_out_block = (d_out.0.add(i0 * d_out.1), d_out.1, 1);
        small_gemm((i1, dim, m), dv.0, dv.1, true, p_t, d_out_block);
        let v_t = (v.0, 1, v.1);
        small_gemm(
            (m, i1, dim),
            dp.as_mut_ptr().add(i0 * seq),
            seq,
            false,
            d_out_block,
            v_t,
        );
        for i in i0..i1 {
            let (p, dp) = (&p[i * seq..i * seq + i1], &mut dp[i * seq..i * seq + i1]);
            let dot = p
                .iter()
                .zip(dp.iter())
                .fold(T::zero(), |a, (&p, &g)| a + p * g);
            for (&p, g) in p.iter().zip(dp.iter_mut()) {
                *g = p * (*g - dot);
            }
        }
        let ds = (dp.as_ptr().add(i0 * seq), seq, 1);
        small_gemm(
            (m, dim, i1),
            dq.0.add(i0 * dq.1),
            dq.1,
            false,
            ds,
            (k.0, k.1, 1),
        );
        let ds_t = (dp.as_ptr().add(i0 * seq), 1, seq);
        small_gemm(
            (i1, dim, m),
            dk.0,
            dk.1,
            true,
            ds_t,
            (q.0.add(i0 * q.1), q.1, 1),
        );
    }
}

/// Where a block of columns sits in a row-major buffer: row stride and first column.
#[derive(Clone, Copy)]
struct Columns {
    stride: usize,
    offset: usize,
}

/// Rotary embedding (Hugging Face rotate-half layout) of `width` columns of every row of
/// `src`, written to `width` columns of `dst`: each `dim`-channel head of a row is rotated
/// by the table row of its position (`row % seq`) and multiplied by `scale`. With
/// `inverse`, the rotation by `-sin` (the transpose, for the backward pass).
#[allow(clippy::too_many_arguments)]
fn rotate<T: Elem>(
    (src, from): (&[T], Columns),
    (dst, to): (&mut [T], Columns),
    width: usize,
    seq: usize,
    (cos, sin): (&[T], &[T]),
    dim: usize,
    scale: T,
    inverse: bool,
) {
    let half = dim / 2;
    let sign = if inverse { -T::one() } else { T::one() };
    dst.par_chunks_mut(to.stride)
        .enumerate()
        .for_each(|(row, dst_row)| {
            let t = row % seq;
            let (c, s) = (&cos[t * dim..(t + 1) * dim], &sin[t * dim..(t + 1) * dim]);
            let x = &src[row * from.stride + from.offset..][..width];
            let y = &mut dst_row[to.offset..to.offset + width];
            for (y, x) in y.chunks_mut(dim).zip(x.chunks(dim)) {
                for i in 0..half {
                    y[i] = scale * (x[i] * c[i] - sign * x[i + half] * s[i]);
                    y[i + half] = scale * (x[i + half] * c[i + half] + sign * x[i] * s[i + half]);
                }
            }
        });
}

/// Sizes shared by the attention kernels. The packed projection has rows of
/// `[q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim)]`.
#[derive(Clone, Copy)]
struct AttentionDims {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
}

impl AttentionDims {
    fn q_width(&self) -> usize {
        self.heads * self.dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.dim
    }

    fn packed_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }

    /// Offsets of the first row of query head `h` (in a `rows x q_width` buffer), of its
    /// key head (in `rows x kv_width`) and of its value head (in the packed buffer).
    fn offsets(&self, b: usize, h: usize) -> (usize, usize, usize) {
        let kv_head = h / (self.heads / self.kv_heads);
        (
            b * self.seq * self.q_width() + h * self.dim,
            b * self.seq * self.kv_width() + kv_head * self.dim,
            b * self.seq * self.packed_width()
                + self.q_width()
                + self.kv_width()
                + kv_head * self.dim,
        )
    }
}

/// Causal softmax self-attention over the packed projection `qkv` (`batch x seq x
/// (heads + 2*kv_heads)*dim`), with rotary embeddings on q and k and `q` scaled by
/// `1/sqrt(dim)`; grouped-query attention when `kv_heads < heads`. Returns `batch x seq x
/// heads*dim`, ready for the output projection. Heads are read in place (no transposes), and
/// the backward recomputes the probabilities instead of keeping `batch x heads x seq x seq`
/// of them alive.
pub struct Attention {
    heads: usize,
    kv_heads: usize,
    /// Rotary tables, `seq x dim`, contiguous.
    cos: Tensor,
    sin: Tensor,
}

impl Attention {
    /// The op for `heads` query and `kv_heads` key/value heads, with rotary tables cut to
    /// the sequence length.
    pub fn new(cos: &Tensor, sin: &Tensor, heads: usize, kv_heads: usize) -> Result<Self> {
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("attention: {heads} heads cannot share {kv_heads} key/value heads");
        }
        Ok(Self {
            heads,
            kv_heads,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }

    fn dims(&self, l: &Layout) -> Result<AttentionDims> {
        let (batch, seq, width) = match l.dims() {
            [b, s, w] => (*b, *s, *w),
            dims => bail!("attention: qkv must be (batch, seq, width), got {dims:?}"),
        };
        let (table_seq, dim) = self.cos.dims2()?;
        let d = AttentionDims {
            batch,
            seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            dim,
        };
        if table_seq != seq || width != d.packed_width() || dim % 2 != 0 {
            bail!(
                "attention: qkv {:?} does not fit {} heads, {} kv heads and tables {:?}",
                l.dims(),
                self.heads,
                self.kv_heads,
                self.cos.dims()
            );
        }
        Ok(d)
    }

    /// Rotated (and, for q, scaled) queries and keys, contiguous `rows x q_width` and
    /// `rows x kv_width`.
    fn rotated_qk<T: Elem>(
        &self,
        qkv: &[T],
        d: AttentionDims,
        tables: (&[T], &[T]),
    ) -> (Vec<T>, Vec<T>) {
        let rows = d.batch * d.seq;
        let (qw, kvw, w) = (d.q_width(), d.kv_width(), d.packed_width());
        let scale = T::from(1.0 / (d.dim as f64).sqrt()).expect("scale fits the float type");
        let mut q = vec![T::zero(); rows * qw];
        let mut k = vec![T::zero(); rows * kvw];
        let packed = |offset| Columns { stride: w, offset };
        let dense = |stride| Columns { stride, offset: 0 };
        rotate(
            (qkv, packed(0)),
            (&mut q, dense(qw)),
            qw,
            d.seq,
            tables,
            d.dim,
            scale,
            false,
        );
        rotate(
            (qkv, packed(qw)),
            (&mut k, dense(kvw)),
            kvw,
            d.seq,
            tables,
            d.dim,
            T::one(),
            false,
        );
        (q, k)
    }
}

/// Borrow the CPU slice of a tensor held by an op (rotary tables, output gradients).
fn with_cpu_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        candle_core::Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => bail!("fused attention: every input must be on the CPU"),
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(op: &Attention, qkv: &[T], d: AttentionDims) -> Result<Vec<T>> {
            let (seq, qw, kvw, w) = (d.seq, d.q_width(), d.kv_width(), d.packed_width());
            let (q, k) = with_cpu_slice(&op.cos, |cos| {
                with_cpu_slice(&op.sin, |sin| Ok(op.rotated_qk(qkv, d, (cos, sin))))
            })?;
            let mut out = vec![T::zero(); d.batch * seq * qw];
            let out_ptr = SharedMut(out.as_mut_ptr());
            (0..d.batch * d.heads).into_par_iter().for_each_init(
                || vec![T::zero(); seq * seq],
                |probs, task| {
                    let (qo, ko, vo) = d.offsets(task / d.heads, task % d.heads);
                    // SAFETY: offsets and strides stay inside q, k, qkv and out; this task
                    // alone writes the rows of its head in out.
                    unsafe {
                        let q = (q[qo..].as_ptr(), qw);
                        let k = (k[ko..].as_ptr(), kvw);
                        let v = (qkv[vo..].as_ptr(), w);
                        head_forward(probs, (seq, d.dim), (q, k, v), (out_ptr.get().add(qo), qw));
                    }
                },
            );
            Ok(out)
        }
        let d = self.dims(l)?;
        let mut shape = l.dims().to_vec();
        shape[2] = d.q_width();
        let shape = Shape::from(shape);
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(self, slice(s, l)?, d)?,
            &shape
        )))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, d_out: &Tensor) -> Result<Option<Tensor>> {
        let grad = AttentionGrad {
            forward: Self {
                heads: self.heads,
                kv_heads: self.kv_heads,
                cos: self.cos.clone(),
                sin: self.sin.clone(),
            },
            d_out: d_out.contiguous()?,
        };
        Ok(Some(qkv.detach().apply_op1_no_bwd(&grad)?))
    }
}

/// The attention backward pass: the gradient of the packed `qkv`.
struct AttentionGrad {
    forward: Attention,
    d_out: Tensor,
}

impl CustomOp1 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        /// Per key/value head: recompute `P`, then `dV += P^T dO`, `dP = dO V^T`,
        /// `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K`, `dK += dS^T Q` over its query
        /// heads; finally undo the rotation (and scale) on dQ and dK.
        fn run<T: Elem + 'static>(
            op: &AttentionGrad,
            qkv: &[T],
            d: AttentionDims,
        ) -> Result<Vec<T>> {
            let (seq, qw, kvw, w) = (d.seq, d.q_width(), d.kv_width(), d.packed_width());
            let rows = d.batch * seq;
            let fwd = &op.forward;
            with_cpu_slice(&fwd.cos, |cos| {
                with_cpu_slice(&fwd.sin, |sin| {
                    with_cpu_slice(&op.d_out, |d_out| {
                        let (q, k) = fwd.rotated_qk(qkv, d, (cos, sin));
                        let mut dq = vec![T::zero(); rows * qw];
                        let mut dk = vec![T::zero(); rows * kvw];
                        let mut grad = vec![T::zero(); rows * w];
                        let (dq_ptr, dk_ptr) =
                            (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()));
                        let grad_ptr = SharedMut(grad.as_mut_ptr());
                        let group = d.heads / d.kv_heads;
                        (0..d.batch * d.kv_heads).into_par_iter().for_each_init(
                            || (vec![T::zero(); seq * seq], vec![T::zero(); seq * seq]),
                            |(p, dp), task| {
                                let (b, kv_head) = (task / d.kv_heads, task % d.kv_heads);
                                for h in kv_head * group..(kv_head + 1) * group {
                                    let (qo, ko, vo) = d.offsets(b, h);
                                    // SAFETY: offsets and strides stay inside every buffer;
                                    // this task alone writes the dq rows of its query heads
                                    // and the dk, dv rows of its key/value head.
                                    unsafe {
                                        let inputs = (
                                            (q[qo..].as_ptr(), qw),
                                            (k[ko..].as_ptr(), kvw),
                                            (qkv[vo..].as_ptr(), w),
                                            (d_out[qo..].as_ptr(), qw),
                                        );
                                        let grads = (
                                            (dq_ptr.get().add(qo), qw),
                                            (dk_ptr.get().add(ko), kvw),
                                            (grad_ptr.get().add(vo), w),
                                        );
                                        head_backward((p, dp), (seq, d.dim), inputs, grads);
                                    }
                                }
                            },
                        );
                        let scale = T::from(1.0 / (d.dim as f64).sqrt())
                            .expect("scale fits the float type");
                        let dense = |stride| Columns { stride, offset: 0 };
                        let packed = |offset| Columns { stride: w, offset };
                        rotate(
                            (&dq, dense(qw)),
                            (&mut grad, packed(0)),
                            qw,
                            seq,
                            (cos, sin),
                            d.dim,
                            scale,
                            true,
                        );
                        rotate(
                            (&dk, dense(kvw)),
                            (&mut grad, packed(qw)),
                            kvw,
                            seq,
                            (cos, sin),
                            d.dim,
                            T::one(),
                            true,
                        );
                        Ok(grad)
                    })
                })
            })
        }
        let d = self.forward.dims(l)?;
        if self.d_out.dims() != [d.batch, d.seq, d.q_width()] {
            bail!(
                "attention-grad: output gradient {:?} does not fit",
                self.d_out.dims()
            );
        }
        float_dispatch!(s, self.name(), |T| Ok(owned(
            run::<T>(self, slice(s, l)?, d)?,
            l.shape()
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Output head and cross-entropy in one op.

fn check_targets(targets: &[u32], vocab: usize) -> Result<()> {
    match targets.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => bail!("cross-entropy: target id {t} is outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}

/// Mean cross-entropy of `x @ w^T` (`x`: `rows x hidden`, `w`: `vocab x hidden`) against
/// `targets` (`rows`, u32).
///
/// The `rows x vocab` logits are the largest tensor of a language model. Here they never
/// become a graph node: the forward turns them into softmax probabilities in place and
/// keeps them in the op, and the backward turns those into `dlogits = (p - onehot) *
/// dloss / rows` in place and multiplies out `dx` and `dw`. That saves the separate
/// gradient tensor and candle's zero-fill and sum of it.
pub struct LinearCrossEntropy {
    targets: Tensor,
    /// Softmax probabilities from the forward pass, `rows x vocab`, for the backward.
    probs: std::sync::Mutex<Option<CpuStorage>>,
}

impl LinearCrossEntropy {
    /// An op for these `targets` (u32, one per row of `x`).
    pub fn new(targets: Tensor) -> Self {
        Self {
            targets,
            probs: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(
            x: &[T],
            w: &[T],
            targets: &[u32],
            (vocab, hidden): (usize, usize),
        ) -> (T, Vec<T>) {
            let rows = targets.len();
            let mut probs = x_times_w_t(x, w, rows, hidden, vocab);
            let row_losses: Vec<T> = probs
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
                    let target_logit = row[t as usize];
                    let mut sum = T::zero();
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inv = T::one() / sum;
                    row.iter_mut().for_each(|v| *v *= inv);
                    max + sum.ln() - target_logit
                })
                .collect();
            // Summed in row order, so the loss does not depend on thread scheduling.
            let total = row_losses.into_iter().fold(T::zero(), |a, b| a + b);
            let rows_t = T::from(rows).expect("row count fits the float type");
            (total / rows_t, probs)
        }
        let (vocab, hidden) = match wl.dims() {
            [v, h] => (*v, *h),
            dims => bail!("linear-cross-entropy: weight must be 2-d, got {dims:?}"),
        };
        let (guard, tl) = self.targets.storage_and_layout();
        let targets = match &*guard {
            candle_core::Storage::Cpu(s) => slice::<u32>(s, tl)?,
            _ => bail!("linear-cross-entropy: targets must be on the CPU"),
        };
        if xl.dims() != [targets.len(), hidden] {
            bail!(
                "linear-cross-entropy: x {:?} must be ({}, {hidden})",
                xl.dims(),
                targets.len()
            );
        }
        check_targets(targets, vocab)?;
        float_dispatch!(xs, self.name(), |T| {
            let (loss, probs) = run::<T>(slice(xs, xl)?, slice(ws, wl)?, targets, (vocab, hidden));
            *self.probs.lock().expect("no panic while holding the lock") =
                Some(T::to_cpu_storage_owned(probs));
            Ok(owned(vec![loss], &Shape::from(())))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .expect("no panic while holding the lock")
            .take()
            .ok_or_else(|| Error::Msg("linear-cross-entropy: backward ran twice".into()))?;
        let rows = x.dim(0)?;
        let vocab = w.dim(0)?;
        let scale = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()? / rows as f64;
        let targets = self.targets.to_vec1::<u32>()?;
        let device = candle_core::Device::Cpu;
        let dlogits = match probs {
            CpuStorage::F32(mut p) => {
                softmax_minus_one_hot(&mut p, &targets, vocab, scale);
                Tensor::from_vec(p, (rows, vocab), &device)?
            }
            CpuStorage::F64(mut p) => {
                softmax_minus_one_hot(&mut p, &targets, vocab, scale);
                Tensor::from_vec(p, (rows, vocab), &device)?
            }
            other => bail!("linear-cross-entropy: unexpected {:?} state", other.dtype()),
        };
        let dx = dlogits.matmul(&w.detach())?;
        let dw = dlogits.t()?.matmul(&x.detach())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `p <- scale * (p - onehot(target))` per row of probabilities `p`, in place.
fn softmax_minus_one_hot<T: Elem>(p: &mut [T], targets: &[u32], vocab: usize, scale: f64) {
    let scale = T::from(scale).expect("scale fits the float type");
    p.par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .for_each(|(row, &t)| {
            row.iter_mut().for_each(|p| *p *= scale);
            row[t as usize] -= scale;
        });
}
