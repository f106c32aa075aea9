//! The token embedding: `y[p] = w[ids[p]]`, and its backward, `dw[v] = sum of dy[p] over
//! the positions p with ids[p] = v` (in position order).
//!
//! Layouts: `w` is `vocab x hidden`, `ids` is `n` (u32), `y` and `dy` are `n x hidden`.
//!
//! Where the fused CPU kernels run, this is candle's `index_select`, whose backward is
//! candle's `index_add`. Elsewhere (a GPU, `train.kernels = reference`) it is an op with its
//! own backward: on CUDA a kernel (`embedding.cu`) with one block per vocabulary row instead
//! of candle's `index_add`, whose one thread per column walks all `n` positions in turn; on
//! the CPU the same loop as `index_add`, so the two paths agree bit for bit.

use crate::cpu_kernels::{float_dispatch, fusable, owned, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The rows of `w` (`vocab x hidden`) that `ids` (`n`, u32) name, `n x hidden`.
pub fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if fusable(w) {
        w.index_select(ids, 0)
    } else {
        w.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)
    }
}

/// `index_select` along the rows, with the backward of [`EmbeddingGrad`].
struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        wl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        select_rows(w, wl, ids, il)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        select_rows(w, wl, ids, il)
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = EmbeddingGrad { vocab: w.dim(0)? };
        let dw = dy.contiguous()?.apply_op2_no_bwd(ids, &grad)?;
        Ok((Some(dw), None))
    }
}

/// The rows of `w` that `ids` name, `n x hidden` (candle's `index_select` on any device's
/// storage).
fn select_rows<S: BackendStorage>(w: &S, wl: &Layout, ids: &S, il: &Layout) -> Result<(S, Shape)> {
    let (_, hidden) = wl.shape().dims2()?;
    let rows = w.index_select(ids, wl, il, 0)?;
    Ok((rows, Shape::from((il.shape().elem_count(), hidden))))
}

/// `dw` (`vocab x hidden`) from `dy` (`n x hidden`) and `ids` (`n`): each row of `dy`
/// added into the row its id names, in position order.
struct EmbeddingGrad {
    vocab: usize,
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "embedding-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dyl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Elem>(dy: &[T], ids: &[u32], vocab: usize) -> Result<Vec<T>> {
            let hidden = dy.len() / ids.len().max(1);
            let mut dw = vec![T::zero(); vocab * hidden];
            for (&id, row) in ids.iter().zip(dy.chunks_exact(hidden)) {
                let Some(out) = dw.get_mut(id as usize * hidden..(id as usize + 1) * hidden) else {
                    candle_core::bail!("token id {id} outside the vocabulary of {vocab}");
                };
                out.iter_mut().zip(row).for_each(|(o, &g)| *o += g);
            }
            Ok(dw)
        }
        let shape = Shape::from((self.vocab, dyl.shape().dims2()?.1));
        let ids: &[u32] = slice(ids, il)?;
        float_dispatch!(dy, self.name(), |T| Ok(owned(
            run::<T>(slice(dy, dyl)?, ids, self.vocab)?,
            &shape
        )))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::embedding_grad(dy, dyl, ids, il, self.vocab)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::{result, sys, Ptx};
    use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape};
    use std::collections::HashMap;
    use std::ffi::{CStr, CString};
    use std::sync::{Mutex, OnceLock};

    /// The kernel's source, compiled by NVRTC on first use (checked by nvcc in CI:
    /// `scripts/check_cuda_build.sh`).
    const SOURCE: &str = include_str!("embedding.cu");
    const KERNEL: &str = "embedding_backward_f32";
    const THREADS: u32 = 256;

    /// The kernel on `device`'s GPU, compiled and loaded once per GPU; `None` (after one
    /// warning) where either failed: the backward then takes candle's `index_add`, slower
    /// but the same sums.
    fn kernel(device: &CudaDevice) -> Option<CudaFunction> {
        static KERNELS: OnceLock<Mutex<HashMap<usize, Option<CudaFunction>>>> = OnceLock::new();
        let context = device.cuda_stream().context().clone();
        let ordinal = context.ordinal();
        let mut kernels = KERNELS.get_or_init(Default::default).lock().ok()?;
        let found = kernels.entry(ordinal).or_insert_with(|| {
            let loaded = context
                .compute_capability()
                .map_err(|e| format!("the driver gives no compute capability: {e:?}"))
                .and_then(|(major, minor)| cubin(&format!("sm_{major}{minor}")))
                .and_then(|cubin| {
                    context
                        .load_module(Ptx::from_binary(cubin))
                        .and_then(|module| module.load_function(KERNEL))
                        .map_err(|e| format!("the driver could not load its cubin: {e:?}"))
                });
            loaded
                .map_err(|why| {
                    eprintln!(
                        "warning: embedding.cu is unavailable on GPU {ordinal} ({why}); the \
                         embedding backward uses candle's index_add (the same sums, slower)"
                    )
                })
                .ok()
        });
        found.clone()
    }

    /// `SOURCE` compiled by NVRTC to a cubin for `arch` (`sm_90`: the device's own
    /// architecture). Not PTX: PTX from a libnvrtc newer than the driver is PTX the driver
    /// cannot JIT, and a cubin needs no JIT at all. An NVRTC too old for the device fails
    /// here, and the caller falls back.
    fn cubin(arch: &str) -> std::result::Result<Vec<u8>, String> {
        let nvrtc = |e: result::NvrtcError| format!("NVRTC: {e:?}");
        let source = CString::new(SOURCE).map_err(|e| e.to_string())?;
        let program = result::create_program(&source, None).map_err(nvrtc)?;
        let options = [format!("--gpu-architecture={arch}")];
        // SAFETY: `program` was just created and is destroyed below, after its last use;
        // the buffers given to NVRTC hold the sizes it reports.
        unsafe {
            let compiled = result::compile_program(program, &options)
                .map_err(|e| {
                    let log = result::get_program_log(program).unwrap_or_default();
                    let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
                    format!("NVRTC could not compile it for {arch}: {e:?}: {log}")
                })
                .and_then(|()| {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(program, &mut size)
                        .result()
                        .map_err(nvrtc)?;
                    let mut cubin = vec![0u8; size];
                    sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast())
                        .result()
                        .map_err(nvrtc)?;
                    Ok(cubin)
                });
            let _ = result::destroy_program(program);
            compiled
        }
    }

    /// `dw` on the GPU: the kernel for f32 gradients and u32 ids, candle's `index_add`
    /// into zeros for any other types (or where the kernel is unavailable).
    pub(super) fn embedding_grad(
        dy: &CudaStorage,
        dyl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
        vocab: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, hidden) = dyl.shape().dims2()?;
        let shape = Shape::from((vocab, hidden));
        let device = dy.device().clone();
        let offsets = (dyl.contiguous_offsets(), il.contiguous_offsets());
        let (
            CudaStorageSlice::F32(dy_all),
            CudaStorageSlice::U32(ids_all),
            (Some(d), Some(i)),
            Some(func),
        ) = (&dy.slice, &ids.slice, offsets, kernel(&device))
        else {
            let zeros = device.zeros_impl(&shape, dy.dtype())?;
            let dwl = Layout::contiguous(shape.clone());
            return Ok((zeros.index_add(&dwl, ids, il, dy, dyl, 0)?, shape));
        };
        let (dy_rows, id_values) = (dy_all.slice(d.0..d.1), ids_all.slice(i.0..i.1));
        // SAFETY: the kernel writes every element of `dw` before any read.
        let dw = unsafe { device.alloc::<f32>(vocab * hidden)? };
        let count = |x: usize| {
            u32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{x} exceeds u32")))
        };
        let config = LaunchConfig {
            grid_dim: (count(vocab)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, hidden) = (count(n)?, count(hidden)?);
        let stream = device.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&id_values);
        launch.arg(&dy_rows);
        launch.arg(&dw);
        launch.arg(&n);
        launch.arg(&hidden);
        // SAFETY: the arguments match the kernel's signature (u32 ids, f32 dy and dw, n,
        // hidden), and the buffers hold n, n x hidden and vocab x hidden elements.
        unsafe { launch.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dw, device), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The op's forward and backward equal candle's `index_select` and its `index_add`
    /// backward exactly, repeated ids included; an id outside the vocabulary is an error.
    #[test]
    fn matches_index_select_and_its_backward() {
        let cpu = &Device::Cpu;
        let w = Var::from_tensor(
            &Tensor::arange(0f32, 40.0, cpu)
                .unwrap()
                .affine(0.37, -3.0)
                .unwrap()
                .reshape((10, 4))
                .unwrap(),
        )
        .unwrap();
        let ids = Tensor::new(&[3u32, 7, 3, 0, 9, 3, 7], cpu).unwrap();
        let weights = Tensor::arange(0f32, 28.0, cpu)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((7, 4))
            .unwrap();
        let run = |y: Tensor| -> (Vec<f32>, Vec<f32>) {
            let grads = (y.clone() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dw = grads.get(w.as_tensor()).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(dw))
        };
        let ours = run(w.as_tensor().apply_op2(&ids, Embedding).unwrap());
        let candle = run(w.as_tensor().index_select(&ids, 0).unwrap());
        assert_eq!(ours, candle);
        let outside = Tensor::new(&[3u32, 10], cpu).unwrap();
        let dy = Tensor::ones((2, 4), DType::F32, cpu).unwrap();
        let err = dy
            .apply_op2_no_bwd(&outside, &EmbeddingGrad { vocab: 10 })
            .unwrap_err();
        assert!(err.to_string().contains("token id 10"), "{err}");
    }
}
