//! Our Triton kernels on CUDA: the cubins `triton/aot.py` compiled in the build (embedded by
//! `build.rs`), loaded once per GPU, and the launch of one with the threads and shared memory
//! it was compiled for. Which cubin: the device's own architecture, else the newest compiled
//! one of the same major version below it (a cubin runs on later minor versions: sm_80's on
//! an sm_86 or sm_89); none (the caller falls back to the reference ops) on any other GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// One compiled kernel: a variant of it for one GPU architecture.
pub struct Cubin {
    /// The kernel's name in its Python source.
    pub kernel: &'static str,
    /// Which of its compiled variants, e.g. `bf16-d64` (operand type, tile columns).
    pub variant: &'static str,
    /// The compute capability it was compiled for, e.g. 90.
    pub arch: u32,
    /// The entry point's name in the cubin.
    pub function: &'static str,
    /// Threads per block: 32 x the warps it was compiled for.
    pub threads: u32,
    /// Dynamic shared memory it needs, bytes.
    pub shared: u32,
    /// Global scratch memory it needs, bytes (our kernels need none: the launch passes null).
    pub scratch: u32,
    /// The cubin itself.
    pub image: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/triton_kernels.rs"));

/// Whether two lists of names are equal, at compile time: the launch code asserts with it
/// that the arguments it pushes are the compiled kernel's parameters, in order.
pub const fn same(a: &[&str], b: &[&str]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        let (x, y) = (a[i].as_bytes(), b[i].as_bytes());
        if x.len() != y.len() {
            return false;
        }
        let mut j = 0;
        while j < x.len() {
            if x[j] != y[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

/// A loaded kernel and the cubin it came from.
#[derive(Clone)]
pub struct Loaded {
    pub function: CudaFunction,
    pub cubin: &'static Cubin,
}

impl Loaded {
    /// The launch of `grid` blocks with the threads and shared memory it was compiled for.
    pub fn config(&self, grid: (u32, u32, u32)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (self.cubin.threads, 1, 1),
            shared_mem_bytes: self.cubin.shared,
        }
    }
}

/// `kernel`'s `variant` on `device`'s GPU, loaded once per GPU; `Err` says why there is none
/// (no cubin for this GPU, or the driver refused it).
pub fn load(device: &CudaDevice, kernel: &str, variant: &str) -> Result<Loaded, String> {
    type Key = (usize, String, String);
    static LOADED: OnceLock<Mutex<HashMap<Key, Result<Loaded, String>>>> = OnceLock::new();
    let context = device.cuda_stream().context().clone();
    let key = (context.ordinal(), kernel.to_string(), variant.to_string());
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "a thread panicked while loading a kernel".to_string())?;
    let found = loaded.entry(key).or_insert_with(|| {
        let (major, minor) = context
            .compute_capability()
            .map_err(|e| format!("no compute capability: {e:?}"))?;
        let arch = (major * 10 + minor) as u32;
        let cubin = CUBINS
            .iter()
            .filter(|c| c.kernel == kernel && c.variant == variant)
            .filter(|c| c.arch / 10 == arch / 10 && c.arch <= arch)
            .max_by_key(|c| c.arch)
            .ok_or_else(|| format!("no {kernel} {variant} cubin for sm_{arch}"))?;
        if cubin.scratch != 0 {
            return Err(format!("{kernel} needs {} B of scratch", cubin.scratch));
        }
        let function = context
            .load_module(Ptx::from_binary(cubin.image.to_vec()))
            .and_then(|module| module.load_function(cubin.function))
            .map_err(|e| format!("the driver could not load {kernel}'s cubin: {e:?}"))?;
        // Beyond 48 KiB a kernel must ask for its dynamic shared memory.
        if cubin.shared > 48 * 1024 {
            let bytes = i32::try_from(cubin.shared).map_err(|e| e.to_string())?;
            let attribute =
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            function.set_attribute(attribute, bytes).map_err(|e| {
                format!("sm_{arch} cannot give {kernel} {bytes} B of shared memory: {e:?}")
            })?;
        }
        Ok(Loaded { function, cubin })
    });
    found.clone()
}

/// Launches `$function` (a [`Loaded`]) on `$stream` with `$config`, pushing the arguments in
/// the order written, each named as the kernel's parameter it fills; the names must be the
/// compiled kernel's `$params`, in order, or the build fails.
macro_rules! launch {
    ($stream:expr, $loaded:expr, $config:expr, $params:expr; $($name:ident = $arg:expr),+ $(,)?) => {{
        const NAMES: &[&str] = &[$(stringify!($name)),+];
        const _: () = assert!(
            $crate::model::ops::triton::same(NAMES, $params),
            "the launch's arguments are not the compiled kernel's parameters"
        );
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let mut builder = $stream.launch_builder(&$loaded.function);
        $( builder.arg($arg); )+
        // SAFETY: the arguments are the kernel's parameters in order (checked above), of the
        // types its signature declares, and the buffers hold the sizes its layouts state.
        unsafe { builder.launch($config) }
    }};
}
pub(crate) use launch;

/// The variant of a kernel compiled once per operand type, for `dtype`.
pub fn type_variant(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F32 => Ok("fp32"),
        dtype => candle_core::bail!("no GPU kernel for {dtype:?}"),
    }
}

/// `kernel`'s variant for `storage`'s type, on its GPU.
pub fn load_for(storage: &CudaStorage, kernel: &str) -> candle_core::Result<Loaded> {
    load(storage.device(), kernel, type_variant(storage.dtype())?).map_err(candle_core::Error::Msg)
}

/// The elements of type `T` that `layout` (contiguous) addresses in `s`.
pub fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a GPU kernel's input is strided".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// A size as the kernels' i32.
pub fn int(x: usize) -> candle_core::Result<i32> {
    i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{x} exceeds a kernel's i32")))
}

/// Blocks of `tile` covering `n` (a grid dimension).
pub fn blocks(n: usize, tile: u32) -> candle_core::Result<u32> {
    u32::try_from(n.div_ceil(tile as usize)).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// The device address of `t`'s first element (`t` contiguous, of type `T`, on a GPU): an entry
/// of the address table a multi-tensor kernel reads to walk many tensors in one launch (the
/// optimizer's update over every parameter, BSFA's projection over every block). Such a
/// kernel may write through the address: the caller holds `t` until the launch is queued,
/// candle frees memory only in stream order, and launches on the device's one stream are
/// ordered, so no other op reads or writes it meanwhile.
pub fn address<T: CudaDType>(t: &candle_core::Tensor) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("a multi-tensor kernel's operand is not on the GPU");
    };
    let (start, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("a GPU kernel's input is strided".into()))?;
    let slice = s.as_cuda_slice::<T>()?;
    let (base, _) = slice.device_ptr(&s.device().cuda_stream());
    Ok(base + (start * std::mem::size_of::<T>()) as u64)
}

/// The [`address`]es of `tensors` as a `u64` array on `device`'s GPU.
pub fn pointer_table<T: CudaDType>(
    device: &CudaDevice,
    tensors: &[&candle_core::Tensor],
) -> candle_core::Result<CudaSlice<u64>> {
    let addresses = tensors
        .iter()
        .map(|t| address::<T>(t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    device.clone_htod(&addresses)
}
