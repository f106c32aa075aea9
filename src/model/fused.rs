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
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, WithDType,
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
// Rotary position embedding (Hugging Face "rotate half" layout), with an output scale.

/// `scale * (x * cos + rotate_half(x) * sin)` per head, for `x` of shape
/// `batch x seq x (heads * head_dim)` (the layout a linear projection produces, so no
/// transpose is needed) and tables of shape `seq x head_dim`.
pub struct Rope {
    pub scale: f64,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(
            x: &[T],
            cos: &[T],
            sin: &[T],
            seq: usize,
            width: usize,
            dim: usize,
            scale: f64,
        ) -> Vec<T> {
            let half = dim / 2;
            let scale = T::from(scale).expect("scale fits the float type");
            let mut y = vec![T::zero(); x.len()];
            // One chunk per (batch, position): every head there shares one table row.
            y.par_chunks_mut(width)
                .zip(x.par_chunks(width))
                .enumerate()
                .for_each(|(row, (y, x))| {
                    let t = row % seq;
                    let (c, s) = (&cos[t * dim..(t + 1) * dim], &sin[t * dim..(t + 1) * dim]);
                    for (y, x) in y.chunks_mut(dim).zip(x.chunks(dim)) {
                        for i in 0..half {
                            y[i] = scale * (x[i] * c[i] - x[i + half] * s[i]);
                            y[i + half] = scale * (x[i + half] * c[i + half] + x[i] * s[i + half]);
                        }
                    }
                });
            y
        }
        let (seq, width) = match xl.dims() {
            [_, seq, width] => (*seq, *width),
            dims => bail!("rope: expected x of shape (batch, seq, heads*head_dim), got {dims:?}"),
        };
        let dim = last_dim(cl);
        if cl.dims() != [seq, dim] || sl.dims() != cl.dims() || dim == 0 || width % dim != 0 {
            bail!("rope: tables {:?} do not fit x {:?}", cl.dims(), xl.dims());
        }
        float_dispatch!(xs, self.name(), |T| Ok(owned(
            run::<T>(
                slice(xs, xl)?,
                slice(cs, cl)?,
                slice(ss, sl)?,
                seq,
                width,
                dim,
                self.scale
            ),
            xl.shape()
        )))
    }

    /// The rotation is orthogonal: its transpose is the same rotation by `-sin`.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let neg_sin = sin.neg()?;
        let dx = dy
            .contiguous()?
            .apply_op3_no_bwd(cos, &neg_sin, &Rope { scale: self.scale })?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU gate: silu(gate) * up.

/// `silu(gate) * up`, elementwise.
pub struct Swiglu;

fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
            let mut y = vec![T::zero(); g.len()];
            y.par_chunks_mut(4096)
                .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
                .for_each(|(y, (g, u))| {
                    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                        *y = g * sigmoid(g) * u;
                    }
                });
            y
        }
        if gl.shape() != ul.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ in shape",
                gl.dims(),
                ul.dims()
            );
        }
        float_dispatch!(gs, self.name(), |T| Ok(owned(
            run::<T>(slice(gs, gl)?, slice(us, ul)?),
            gl.shape()
        )))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dgate = gate.apply_op3_no_bwd(up, &dy, &SwigluGrad { wrt_gate: true })?;
        let dup = gate.apply_op3_no_bwd(up, &dy, &SwigluGrad { wrt_gate: false })?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `d/dgate = dy * up * s * (1 + g * (1 - s))` or `d/dup = dy * g * s`, with `s = sigmoid(g)`.
struct SwigluGrad {
    wrt_gate: bool,
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(g: &[T], u: &[T], dy: &[T], wrt_gate: bool) -> Vec<T> {
            let mut out = vec![T::zero(); g.len()];
            out.par_chunks_mut(4096)
                .zip(
                    g.par_chunks(4096)
                        .zip(u.par_chunks(4096).zip(dy.par_chunks(4096))),
                )
                .for_each(|(out, (g, (u, dy)))| {
                    for (((o, &g), &u), &d) in out.iter_mut().zip(g).zip(u).zip(dy) {
                        let s = sigmoid(g);
                        *o = if wrt_gate {
                            d * u * s * (T::one() + g * (T::one() - s))
                        } else {
                            d * g * s
                        };
                    }
                });
            out
        }
        float_dispatch!(gs, self.name(), |T| Ok(owned(
            run::<T>(
                slice(gs, gl)?,
                slice(us, ul)?,
                slice(dys, dyl)?,
                self.wrt_gate
            ),
            gl.shape()
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
// Causal self-attention.

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
#[allow(clippy::too_many_arguments)]
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

/// Sizes shared by the attention kernels.
#[derive(Clone, Copy)]
struct AttentionDims {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
}

impl AttentionDims {
    fn of(ql: &Layout, kl: &Layout, vl: &Layout, heads: usize, kv_heads: usize) -> Result<Self> {
        let (batch, seq, width) = match ql.dims() {
            [b, s, w] => (*b, *s, *w),
            dims => bail!("attention: q must be (batch, seq, heads*head_dim), got {dims:?}"),
        };
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || width % heads != 0 {
            bail!("attention: {heads} heads and {kv_heads} kv heads do not fit width {width}");
        }
        let dim = width / heads;
        let kv_dims = [batch, seq, kv_heads * dim];
        if kl.dims() != kv_dims || vl.dims() != kv_dims {
            bail!(
                "attention: k {:?} and v {:?} must be {kv_dims:?}",
                kl.dims(),
                vl.dims()
            );
        }
        Ok(Self {
            batch,
            seq,
            heads,
            kv_heads,
            dim,
        })
    }

    fn q_width(&self) -> usize {
        self.heads * self.dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.dim
    }

    /// Offsets of the first row of query head `h` and of its key/value head, in batch `b`.
    fn offsets(&self, b: usize, h: usize) -> (usize, usize) {
        let kv_head = h / (self.heads / self.kv_heads);
        (
            b * self.seq * self.q_width() + h * self.dim,
            b * self.seq * self.kv_width() + kv_head * self.dim,
        )
    }
}

/// Causal softmax attention `softmax(q k^T) v` for `q` of shape `batch x seq x (heads*dim)`
/// and `k`, `v` of shape `batch x seq x (kv_heads*dim)` (grouped-query attention when
/// `kv_heads < heads`). The caller scales `q`. Reads and writes the projections' layout
/// directly, so no head transposes are materialised; the backward recomputes the
/// probabilities instead of keeping `batch x heads x seq x seq` of them alive.
pub struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(q: &[T], k: &[T], v: &[T], d: AttentionDims) -> Vec<T> {
            let (seq, qw, kvw) = (d.seq, d.q_width(), d.kv_width());
            let mut out = vec![T::zero(); q.len()];
            let out_ptr = SharedMut(out.as_mut_ptr());
            (0..d.batch * d.heads).into_par_iter().for_each_init(
                || vec![T::zero(); seq * seq],
                |probs, task| {
                    let (qo, ko) = d.offsets(task / d.heads, task % d.heads);
                    // SAFETY: offsets and strides stay inside q, k, v and out; this task
                    // alone writes the rows of head `task` in out.
                    unsafe {
                        small_gemm(
                            (seq, seq, d.dim),
                            probs.as_mut_ptr(),
                            seq,
                            false,
                            (q[qo..].as_ptr(), qw, 1),
                            (k[ko..].as_ptr(), 1, kvw),
                        );
                        causal_softmax_rows(probs, seq);
                        small_gemm(
                            (seq, d.dim, seq),
                            out_ptr.get().add(qo),
                            qw,
                            false,
                            (probs.as_ptr(), seq, 1),
                            (v[ko..].as_ptr(), kvw, 1),
                        );
                    }
                },
            );
            out
        }
        let d = AttentionDims::of(ql, kl, vl, self.heads, self.kv_heads)?;
        float_dispatch!(qs, self.name(), |T| Ok(owned(
            run::<T>(slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?, d),
            ql.shape()
        )))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = CausalAttentionGrad {
            heads: self.heads,
            kv_heads: self.kv_heads,
            d_out: d_out.contiguous()?,
        };
        let packed = q
            .detach()
            .apply_op3_no_bwd(&k.detach(), &v.detach(), &grad)?;
        let (nq, nkv) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nkv)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nkv, nkv)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The attention backward pass; its output packs `[dq | dk | dv]` into one flat tensor.
struct CausalAttentionGrad {
    heads: usize,
    kv_heads: usize,
    d_out: Tensor,
}

impl CustomOp3 for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        /// Per key/value head: recompute `P`, then `dV += P^T dO`, `dP = dO V^T`,
        /// `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K`, `dK += dS^T Q` over its query heads.
        fn run<T: Elem + 'static>(
            q: &[T],
            k: &[T],
            v: &[T],
            d_out: &[T],
            d: AttentionDims,
        ) -> Vec<T> {
            let (seq, qw, kvw) = (d.seq, d.q_width(), d.kv_width());
            let (nq, nkv) = (q.len(), k.len());
            let mut grads = vec![T::zero(); nq + 2 * nkv];
            let ptr = SharedMut(grads.as_mut_ptr());
            let group = d.heads / d.kv_heads;
            (0..d.batch * d.kv_heads).into_par_iter().for_each_init(
                || (vec![T::zero(); seq * seq], vec![T::zero(); seq * seq]),
                |(p, dp), task| {
                    let (b, kv_head) = (task / d.kv_heads, task % d.kv_heads);
                    for h in kv_head * group..(kv_head + 1) * group {
                        let (qo, ko) = d.offsets(b, h);
                        // SAFETY: offsets and strides stay inside the inputs and `grads`;
                        // this task alone writes dq rows of its query heads and the dk, dv
                        // rows of its key/value head.
                        unsafe {
                            let (dq, dk, dv) = (
                                ptr.get().add(qo),
                                ptr.get().add(nq + ko),
                                ptr.get().add(nq + nkv + ko),
                            );
                            small_gemm(
                                (seq, seq, d.dim),
                                p.as_mut_ptr(),
                                seq,
                                false,
                                (q[qo..].as_ptr(), qw, 1),
                                (k[ko..].as_ptr(), 1, kvw),
                            );
                            causal_softmax_rows(p, seq);
                            small_gemm(
                                (seq, d.dim, seq),
                                dv,
                                kvw,
                                true,
                                (p.as_ptr(), 1, seq),
                                (d_out[qo..].as_ptr(), qw, 1),
                            );
                            small_gemm(
                                (seq, seq, d.dim),
                                dp.as_mut_ptr(),
                                seq,
                                false,
                                (d_out[qo..].as_ptr(), qw, 1),
                                (v[ko..].as_ptr(), 1, kvw),
                            );
                            for (p, dp) in p.chunks(seq).zip(dp.chunks_mut(seq)) {
                                let dot = p
                                    .iter()
                                    .zip(dp.iter())
                                    .fold(T::zero(), |a, (&p, &g)| a + p * g);
                                for (&p, g) in p.iter().zip(dp.iter_mut()) {
                                    *g = p * (*g - dot);
                                }
                            }
                            small_gemm(
                                (seq, d.dim, seq),
                                dq,
                                qw,
                                false,
                                (dp.as_ptr(), seq, 1),
                                (k[ko..].as_ptr(), kvw, 1),
                            );
                            small_gemm(
                                (seq, d.dim, seq),
                                dk,
                                kvw,
                                true,
                                (dp.as_ptr(), 1, seq),
                                (q[qo..].as_ptr(), qw, 1),
                            );
                        }
                    }
                },
            );
            grads
        }
        let d = AttentionDims::of(ql, kl, vl, self.heads, self.kv_heads)?;
        let (guard, dl) = self.d_out.storage_and_layout();
        let ds = match &*guard {
            candle_core::Storage::Cpu(s) => s,
            _ => bail!("causal-attention-grad: the output gradient must be on the CPU"),
        };
        if dl.dims() != ql.dims() {
            bail!(
                "causal-attention-grad: output gradient {:?} must match q {:?}",
                dl.dims(),
                ql.dims()
            );
        }
        let shape = Shape::from(ql.shape().elem_count() + 2 * kl.shape().elem_count());
        float_dispatch!(qs, self.name(), |T| Ok(owned(
            run::<T>(
                slice(qs, ql)?,
                slice(ks, kl)?,
                slice(vs, vl)?,
                slice(ds, dl)?,
                d
            ),
            &shape
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
