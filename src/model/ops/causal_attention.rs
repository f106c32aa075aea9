//! LLaMA's causal self-attention: rotary embeddings on queries and keys, queries scaled by
//! `1/sqrt(head_dim)`, grouped-query attention when `kv_heads < heads`.
//!
//! Layouts: `x` is `batch x seq x hidden`; `wq` is `heads*head_dim x hidden`, `wk` and `wv`
//! `kv_heads*head_dim x hidden`; the rotary tables are `seq x head_dim`; the result is
//! `batch x seq x heads*head_dim`. Fused, the three projections are one linear layer whose
//! packed output, rows of `[q (heads*dim) | k (kv_heads*dim) | v (kv_heads*dim)]`, the
//! kernel reads in place (no head transposes); its backward returns the gradient of that
//! packed output, recomputing the probabilities instead of keeping `batch x heads x seq x
//! seq` of them alive.

use super::kernel::{row_chunks, small_gemm, with_cpu_slice, SharedMut};
use super::linear::linear;
use super::rope::{rotate, Columns};
use super::softmax::{softmax_grad_in_place, softmax_in_place};
use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Causal self-attention of `x` (`batch x seq x hidden`) with query, key and value
/// projections `wq` (`heads*head_dim x hidden`), `wk`, `wv` (`kv_heads*head_dim x hidden`),
/// rotary embeddings from `cos`/`sin` (cut to `seq x head_dim`) and queries scaled by
/// `1/sqrt(head_dim)`. Returns `batch x seq x heads*head_dim`, ready for the output
/// projection. Fused, the three projections are one matmul and attention reads their packed
/// output in place.
pub fn attention(
    x: &Tensor,
    (wq, wk, wv): (&Tensor, &Tensor, &Tensor),
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    if fusable(x) || gpu_kernels_apply(x, (cos, sin), heads, kv_heads) {
        let qkv = linear(x, &Tensor::cat(&[wq, wk, wv], 0)?)?;
        qkv.apply_op1(CausalAttention::new(cos, sin, heads, kv_heads)?)
    } else {
        reference::attention(x, (wq, wk, wv), (cos, sin), heads, kv_heads)
    }
}

/// Whether `x` is on a GPU whose Triton attention kernels serve this shape (`cuda` module).
#[cfg(feature = "cuda")]
fn gpu_kernels_apply(x: &Tensor, (cos, sin): (&Tensor, &Tensor), heads: usize, kv: usize) -> bool {
    cuda::applies(x, cos, sin, heads, kv)
}

#[cfg(not(feature = "cuda"))]
fn gpu_kernels_apply(_: &Tensor, _: (&Tensor, &Tensor), _: usize, _: usize) -> bool {
    false
}

#[cfg(feature = "cuda")]
#[path = "causal_attention_cuda.rs"]
mod cuda;

/// Additive causal mask (`seq x seq`): 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// Causal softmax of each row of a `seq x seq` score matrix, in place.
fn causal_softmax_rows<T: Elem>(scores: &mut [T], seq: usize) {
    for (i, row) in scores.chunks_mut(seq).enumerate() {
        let (visible, hidden) = row.split_at_mut(i + 1);
        softmax_in_place(visible);
        hidden.iter_mut().for_each(|v| *v = T::zero());
    }
}

/// A row-major matrix operand: pointer to its first element and row stride.
type Rows<T> = (*const T, usize);
/// A row-major matrix destination: pointer to its first element and row stride.
type RowsMut<T> = (*mut T, usize);

/// `probs = causal_softmax(q k^T)` for one head, chunk of query rows by chunk.
///
/// # Safety
/// `q` and `k` must address `seq` rows of `dim` elements at their strides.
unsafe fn head_probs<T: Elem + 'static>(
    probs: &mut [T],
    (seq, dim): (usize, usize),
    q: Rows<T>,
    k: Rows<T>,
) {
    for chunk in row_chunks(seq) {
        let (i0, i1) = (chunk.start, chunk.end);
        let q_chunk = (q.0.add(i0 * q.1), q.1, 1);
        let k_t = (k.0, 1, k.1);
        small_gemm(
            (i1 - i0, i1, dim),
            probs.as_mut_ptr().add(i0 * seq),
            seq,
            false,
            q_chunk,
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
    for chunk in row_chunks(seq) {
        let (i0, i1) = (chunk.start, chunk.end);
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

/// One head's backward pass: recompute `P`, then per chunk of query rows `dV += P^T dO`,
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
    for chunk in row_chunks(seq) {
        let (i0, i1) = (chunk.start, chunk.end);
        let m = i1 - i0;
        let p_t = (p.as_ptr().add(i0 * seq), 1, seq);
        let d_out_chunk = (d_out.0.add(i0 * d_out.1), d_out.1, 1);
        small_gemm((i1, dim, m), dv.0, dv.1, true, p_t, d_out_chunk);
        let v_t = (v.0, 1, v.1);
        small_gemm(
            (m, i1, dim),
            dp.as_mut_ptr().add(i0 * seq),
            seq,
            false,
            d_out_chunk,
            v_t,
        );
        for i in i0..i1 {
            softmax_grad_in_place(&p[i * seq..i * seq + i1], &mut dp[i * seq..i * seq + i1]);
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
struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    /// Rotary tables, `seq x dim`, contiguous.
    cos: Tensor,
    sin: Tensor,
    /// On CUDA, each row's log-sum-exp from the forward, until the backward takes it.
    #[cfg(feature = "cuda")]
    stats: std::sync::Mutex<Option<cuda::RowStats>>,
}

impl CausalAttention {
    /// The op for `heads` query and `kv_heads` key/value heads, with rotary tables cut to
    /// the sequence length.
    fn new(cos: &Tensor, sin: &Tensor, heads: usize, kv_heads: usize) -> Result<Self> {
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("attention: {heads} heads cannot share {kv_heads} key/value heads");
        }
        Ok(Self {
            heads,
            kv_heads,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            #[cfg(feature = "cuda")]
            stats: Default::default(),
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

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem + 'static>(
            op: &CausalAttention,
            qkv: &[T],
            d: AttentionDims,
        ) -> Result<Vec<T>> {
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, shape, stats) = cuda::forward(self, s, l, self.dims(l)?)?;
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))? = Some(stats);
        Ok((out, shape))
    }

    #[allow(unused_variables)] // `out` serves the CUDA backward only
    fn bwd(&self, qkv: &Tensor, out: &Tensor, d_out: &Tensor) -> Result<Option<Tensor>> {
        let grad = CausalAttentionGrad {
            forward: Self::new(&self.cos, &self.sin, self.heads, self.kv_heads)?,
            d_out: d_out.contiguous()?,
            #[cfg(feature = "cuda")]
            gpu: match self.stats.lock().ok().and_then(|mut s| s.take()) {
                Some(stats) => Some((out.contiguous()?, stats)),
                None => None,
            },
        };
        Ok(Some(qkv.detach().apply_op1_no_bwd(&grad)?))
    }
}

/// The attention backward pass: the gradient of the packed `qkv`.
struct CausalAttentionGrad {
    forward: CausalAttention,
    d_out: Tensor,
    /// On CUDA: the forward's output and row statistics.
    #[cfg(feature = "cuda")]
    gpu: Option<(Tensor, cuda::RowStats)>,
}

impl CustomOp1 for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        /// Per key/value head: recompute `P`, then `dV += P^T dO`, `dP = dO V^T`,
        /// `dS = P * (dP - rowsum(P * dP))`, `dQ = dS K`, `dK += dS^T Q` over its query
        /// heads; finally undo the rotation (and scale) on dQ and dK.
        fn run<T: Elem + 'static>(
            op: &CausalAttentionGrad,
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Some((out, stats)) = &self.gpu else {
            bail!("attention-grad: the CUDA forward kept no row statistics");
        };
        let d = self.forward.dims(l)?;
        cuda::backward(&self.forward, s, l, d, (out, &self.d_out, stats))
    }
}

/// Causal attention as candle primitives.
pub mod reference {
    use super::super::rope::reference::rope;
    use super::super::softmax::reference::softmax_last_dim;
    use candle_core::{Result, Tensor};

    /// [`super::attention`] as candle primitives: three linear layers, then
    /// [`causal_attention`].
    pub fn attention(
        x: &Tensor,
        (wq, wk, wv): (&Tensor, &Tensor, &Tensor),
        (cos, sin): (&Tensor, &Tensor),
        heads: usize,
        kv_heads: usize,
    ) -> Result<Tensor> {
        use super::super::linear::reference::linear;
        let (q, k, v) = (linear(x, wq)?, linear(x, wk)?, linear(x, wv)?);
        causal_attention(&q, &k, &v, (cos, sin), heads, kv_heads)
    }

    /// Causal attention of the projected `q` (`batch x seq x heads*head_dim`), `k` and `v`
    /// (`batch x seq x kv_heads*head_dim`) as matmuls, a masked softmax and head transposes.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        heads: usize,
        kv_heads: usize,
    ) -> Result<Tensor> {
        let (batch, seq, width) = q.dims3()?;
        let head_dim = width / heads;
        let split_heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((batch, seq, n, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (rope(q, cos, sin)? * (1.0 / (head_dim as f64).sqrt()))?;
        let q = split_heads(q, heads)?;
        let k = repeat_kv(split_heads(rope(k, cos, sin)?, kv_heads)?, heads / kv_heads)?;
        let v = repeat_kv(split_heads(v.clone(), kv_heads)?, heads / kv_heads)?;
        let mask = super::causal_mask(seq, q.dtype(), q.device())?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
        let probs = softmax_last_dim(&super::super::widen(&scores)?)?.to_dtype(v.dtype())?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, width))
    }

    /// Repeats each key/value head `n_rep` times so grouped heads line up with query heads.
    fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
        if n_rep == 1 {
            return Ok(x);
        }
        let (b, kv_heads, seq, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv_heads, n_rep, seq, d))?
            .reshape((b, kv_heads * n_rep, seq, d))
    }
}
