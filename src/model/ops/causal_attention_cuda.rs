//! Causal attention on CUDA: the Triton kernels of `triton/causal_attention.py` (layouts and
//! grids stated there) behind the op's `cuda_fwd` (forward: `attention_forward`, keeping each
//! row's log-sum-exp) and its gradient op's (`attention_delta`, `attention_dkdv`,
//! `attention_dq`). bf16 or f32, head dims up to 128.
//!
//! Before a GPU's first use of the kernels for a shape (heads, key/value heads, head dim,
//! type), [`applies`] runs them against the reference composition on a small input of that
//! shape, forward and backward; on disagreement, or where a kernel cannot load, it warns once
//! and the run takes the reference ops.

use super::super::gpu_self_check as self_check;
use super::super::triton::{self, launch, Loaded};
use super::{reference, AttentionDims, CausalAttention};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor,
};

/// Each row's log-sum-exp of scaled scores (`batch x heads x seq`), from the forward for
/// the backward.
pub(super) type RowStats = CudaSlice<f32>;

/// The compiled variant for `dtype` and head dim `dim`, if any.
fn variant(dtype: DType, dim: usize) -> Option<String> {
    let ty = match dtype {
        DType::BF16 => "bf16",
        DType::F32 => "fp32",
        _ => return None,
    };
    let full = match dim {
        d if d % 2 != 0 || d == 0 => return None,
        d if d <= 64 => 64,
        d if d <= 128 => 128,
        _ => return None,
    };
    Some(format!("{ty}-d{full}"))
}

/// The four kernels for `dtype` and head dim `dim` on `device`'s GPU.
fn kernels(device: &CudaDevice, dtype: DType, dim: usize) -> Result<[Loaded; 4]> {
    let variant = variant(dtype, dim).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "attention on CUDA: no kernel for {dtype:?}, dim {dim}"
        ))
    })?;
    let load = |kernel| triton::load(device, kernel, &variant).map_err(candle_core::Error::Msg);
    Ok([
        load("attention_forward")?,
        load("attention_delta")?,
        load("attention_dkdv")?,
        load("attention_dq")?,
    ])
}

/// The size arguments the kernels take (`seq`, `heads`, `kv_heads`, `dim` as i32) and the
/// queries' scale `1/sqrt(dim)`.
struct Sizes {
    seq: i32,
    heads: i32,
    kv_heads: i32,
    dim: i32,
    scale: f32,
}

impl Sizes {
    fn of(d: AttentionDims) -> Result<Self> {
        Ok(Self {
            seq: triton::int(d.seq)?,
            heads: triton::int(d.heads)?,
            kv_heads: triton::int(d.kv_heads)?,
            dim: triton::int(d.dim)?,
            scale: 1.0 / (d.dim as f32).sqrt(),
        })
    }
}

/// Whether attention on `x` (`batch x seq x hidden`, on a GPU) runs our kernels: a CUDA
/// tensor of a compiled type and head dim, `train.kernels` not `reference`, the kernels
/// loaded for its GPU and their self-check passed for this shape.
pub(super) fn applies(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> bool {
    let Ok((_, dim)) = cos.dims2() else {
        return false;
    };
    if variant(x.dtype(), dim).is_none() {
        return false;
    }
    let shape = format!("{heads} heads, {kv_heads} kv heads, head dim {dim}");
    self_check::applies(x, "attention", shape, || {
        self_check(x, (cos, sin), heads, kv_heads)
    })
}

/// The worst relative difference between the kernels and the reference composition, forward
/// output and gradient, on one random sequence of `x`'s shape (at most 256 positions).
fn self_check(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    kv_heads: usize,
) -> Result<f64> {
    let Device::Cuda(device) = x.device() else {
        bail!("not a CUDA tensor");
    };
    let dim = cos.dims2()?.1;
    kernels(device, x.dtype(), dim)?;
    let seq = x.dims3()?.1.min(256);
    let (cos, sin) = (cos.narrow(0, 0, seq)?, sin.narrow(0, 0, seq)?);
    let widths = [heads * dim, kv_heads * dim, kv_heads * dim];
    let qkv = self_check::random(
        (1, seq, widths.iter().sum::<usize>()),
        x.dtype(),
        x.device(),
    )?;
    self_check::worst_difference(
        &[qkv],
        |v| v[0].apply_op1(CausalAttention::new(&cos, &sin, heads, kv_heads)?),
        |v| {
            let part = |i: usize| v[0].narrow(2, widths[..i].iter().sum(), widths[i]);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            reference::causal_attention(&q, &k, &v, (&cos, &sin), heads, kv_heads)
        },
    )
}

/// [`triton::view`] of a tensor's storage (held by the caller's guard).
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        bail!("attention: a table or gradient is not on the GPU");
    };
    triton::view(s, layout)
}

/// The forward: `out` (`batch x seq x heads*dim`) and each row's log-sum-exp.
pub(super) fn forward(
    op: &CausalAttention,
    qkv: &CudaStorage,
    l: &Layout,
    d: AttentionDims,
) -> Result<(CudaStorage, Shape, RowStats)> {
    fn run<T: CudaDType + DeviceRepr>(
        op: &CausalAttention,
        qkv: &CudaStorage,
        l: &Layout,
        d: AttentionDims,
    ) -> Result<(CudaStorage, RowStats)> {
        let device = qkv.device().clone();
        let [forward, ..] = kernels(&device, qkv.dtype(), d.dim)?;
        let qkv = triton::view::<T>(qkv, l)?;
        let (cos_storage, cos_layout) = op.cos.storage_and_layout();
        let (sin_storage, sin_layout) = op.sin.storage_and_layout();
        let cos = view::<T>(&cos_storage, cos_layout)?;
        let sin = view::<T>(&sin_storage, sin_layout)?;
        let rows = d.batch * d.seq;
        // SAFETY: the kernel writes every element of `out` and `lse` (rows below `seq`).
        let out = unsafe { device.alloc::<T>(rows * d.q_width())? };
        let lse = unsafe { device.alloc::<f32>(d.batch * d.heads * d.seq)? };
        let n = Sizes::of(d)?;
        let grid = (
            triton::blocks(d.seq, triton::ATTENTION_BLOCK_M)?,
            triton::blocks(d.batch * d.heads, 1)?,
            1,
        );
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, forward, forward.config(grid), triton::ATTENTION_FORWARD_PARAMS;
            qkv = &qkv, cos = &cos, sin = &sin, out = &out, lse = &lse, seq = &n.seq,
            heads = &n.heads, kv_heads = &n.kv_heads, dim = &n.dim, scale = &n.scale,
            scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), lse))
    }
    let (out, lse) = match qkv.dtype() {
        DType::BF16 => run::<half::bf16>(op, qkv, l, d)?,
        DType::F32 => run::<f32>(op, qkv, l, d)?,
        dtype => bail!("attention on CUDA: no kernel for {dtype:?}"),
    };
    Ok((out, Shape::from((d.batch, d.seq, d.q_width())), lse))
}

/// The backward: the gradient of the packed `qkv`, from the forward's `out` and row
/// statistics and the output's gradient `d_out`.
pub(super) fn backward(
    op: &CausalAttention,
    qkv: &CudaStorage,
    l: &Layout,
    d: AttentionDims,
    (out, d_out, lse): (&Tensor, &Tensor, &RowStats),
) -> Result<(CudaStorage, Shape)> {
    fn run<T: CudaDType + DeviceRepr>(
        op: &CausalAttention,
        qkv: &CudaStorage,
        l: &Layout,
        d: AttentionDims,
        (out, d_out, lse): (&Tensor, &Tensor, &RowStats),
    ) -> Result<CudaStorage> {
        let device = qkv.device().clone();
        let [_, delta_kernel, dkdv, dq] = kernels(&device, qkv.dtype(), d.dim)?;
        let qkv = triton::view::<T>(qkv, l)?;
        let (cos_storage, cos_layout) = op.cos.storage_and_layout();
        let (sin_storage, sin_layout) = op.sin.storage_and_layout();
        let (out_storage, out_layout) = out.storage_and_layout();
        let (d_out_storage, d_out_layout) = d_out.storage_and_layout();
        let cos = view::<T>(&cos_storage, cos_layout)?;
        let sin = view::<T>(&sin_storage, sin_layout)?;
        let out = view::<T>(&out_storage, out_layout)?;
        let d_out = view::<T>(&d_out_storage, d_out_layout)?;
        // SAFETY: the q columns are written by `attention_dq`, the k and v columns by
        // `attention_dkdv`, every row below `seq`: no element is left unwritten.
        let d_qkv = unsafe { device.alloc::<T>(d.batch * d.seq * d.packed_width())? };
        let delta = unsafe { device.alloc::<f32>(d.batch * d.heads * d.seq)? };
        let n = Sizes::of(d)?;
        let row_blocks = triton::blocks(d.seq, triton::ATTENTION_BLOCK_M)?;
        let key_blocks = triton::blocks(d.seq, triton::ATTENTION_BLOCK_N)?;
        let query_heads = triton::blocks(d.batch * d.heads, 1)?;
        let key_heads = triton::blocks(d.batch * d.kv_heads, 1)?;
        let null = 0u64;
        let stream = device.cuda_stream();
        launch!(stream, delta_kernel, delta_kernel.config((row_blocks, query_heads, 1)),
            triton::ATTENTION_DELTA_PARAMS;
            out = &out, d_out = &d_out, delta = &delta, seq = &n.seq, heads = &n.heads, dim = &n.dim,
            scratch0 = &null, scratch1 = &null)
        .w()?;
        launch!(stream, dkdv, dkdv.config((key_blocks, key_heads, 1)), triton::ATTENTION_DKDV_PARAMS;
            qkv = &qkv, cos = &cos, sin = &sin, d_out = &d_out, lse = lse, delta = &delta,
            d_qkv = &d_qkv, seq = &n.seq, heads = &n.heads, kv_heads = &n.kv_heads, dim = &n.dim,
            scale = &n.scale, scratch0 = &null, scratch1 = &null)
        .w()?;
        launch!(stream, dq, dq.config((row_blocks, query_heads, 1)), triton::ATTENTION_DQ_PARAMS;
            qkv = &qkv, cos = &cos, sin = &sin, d_out = &d_out, lse = lse, delta = &delta,
            d_qkv = &d_qkv, seq = &n.seq, heads = &n.heads, kv_heads = &n.kv_heads, dim = &n.dim,
            scale = &n.scale, scratch0 = &null, scratch1 = &null)
        .w()?;
        Ok(CudaStorage::wrap_cuda_slice(d_qkv, device))
    }
    let grads = (out, d_out, lse);
    let d_qkv = match qkv.dtype() {
        DType::BF16 => run::<half::bf16>(op, qkv, l, d, grads)?,
        DType::F32 => run::<f32>(op, qkv, l, d, grads)?,
        dtype => bail!("attention on CUDA: no kernel for {dtype:?}"),
    };
    Ok((d_qkv, Shape::from((d.batch, d.seq, d.packed_width()))))
}
