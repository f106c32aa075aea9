//! [`NcclCommunicator`]: the collectives of GPU data parallelism on CUDA tensors through
//! NCCL, one process (rank) per GPU.
//!
//! NCCL moves the tensors; a CPU [`Communicator`] of the same ranks (the control channel)
//! carries the NCCL bootstrap (rank 0's unique id), the small byte messages, barriers and
//! aborts. The collectives are enqueued on the CUDA stream of the candle device the
//! communicator was made for, the stream candle runs every kernel of that device on, so
//! they are ordered with the computation that produces and consumes their tensors without
//! any host synchronisation.

use std::ffi::c_char;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, Context as _, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

use super::Communicator;

/// Bytes in an NCCL unique id (`ncclUniqueId::internal`).
const NCCL_ID_BYTES: usize = 128;

/// A [`Communicator`] whose tensor collectives run on CUDA tensors through NCCL, and whose
/// byte messages, barriers and aborts go through a CPU control communicator.
///
/// Tensors passed to [`Communicator::all_reduce_sum`] and [`Communicator::broadcast`] must
/// live on the device given to [`NcclCommunicator::new`] (the same candle device, hence the
/// same CUDA stream); the supported dtypes are f32, bf16, f16, f64, u8, u32, i32 and i64.
/// The results are new tensors; the work is only enqueued on the device's stream.
pub struct NcclCommunicator {
    // Dropped first: aborting the NCCL communicator never needs the control channel.
    nccl: Mutex<RankComm>,
    control: Box<dyn Communicator>,
    device: Device,
    rank: usize,
    world: usize,
}

/// One rank's NCCL communicator, movable between threads.
struct RankComm(Comm);

// SAFETY: an NCCL communicator (`ncclComm_t`, a raw pointer inside `Comm`) is not tied to
// the thread that created it: NCCL only forbids concurrent calls on one communicator, and
// `NcclCommunicator` only reaches it through its `Mutex`, one call at a time. Every other
// field of `Comm` (an `Arc<CudaStream>`, integers) is `Send` already.
unsafe impl Send for RankComm {}

impl NcclCommunicator {
    /// Joins the NCCL communicator of all `control.world()` ranks on the CUDA device of
    /// `device`, as rank `control.rank()`.
    ///
    /// `control` is an already connected CPU communicator of the same ranks: rank 0 makes
    /// the NCCL unique id and shares it through `control.all_gather_bytes`, then every rank
    /// initialises NCCL, which blocks until all ranks have joined. Every rank must call
    /// this at the same point, each with its own GPU. On an error this rank tells the others
    /// through `control.abort` (ranks already inside NCCL's initialisation may not notice).
    pub fn new(control: Box<dyn Communicator>, device: &Device) -> Result<Self> {
        match Self::join(&*control, device) {
            Ok(comm) => Ok(Self {
                nccl: Mutex::new(RankComm(comm)),
                rank: control.rank(),
                world: control.world(),
                control,
                device: device.clone(),
            }),
            Err(e) => {
                control.abort(&format!(
                    "rank {} could not join NCCL: {e:#}",
                    control.rank()
                ));
                Err(e)
            }
        }
    }

    /// The NCCL bootstrap: share rank 0's unique id, then initialise this rank's `Comm`.
    fn join(control: &dyn Communicator, device: &Device) -> Result<Comm> {
        let (rank, world) = (control.rank(), control.world());
        if rank >= world {
            bail!("rank {rank} is outside a world of {world} ranks");
        }
        // NCCL counts ranks in C ints (cudarc would panic converting a larger world).
        i32::try_from(world).context("too many ranks for NCCL")?;
        let cuda = device
            .as_cuda_device()
            .context("NCCL collectives need a CUDA device")?;
        let stream = cuda.cuda_stream();
        // ncclGetUniqueId and ncclCommInitRank work on the device current on this thread.
        stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context to this thread")?;

        let mine = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let gathered = control
            .all_gather_bytes(&mine)
            .context("sharing the NCCL unique id")?;
        let root_id = gathered
            .first()
            .ok_or_else(|| anyhow!("the control communicator gathered no messages"))?;
        if root_id.len() != NCCL_ID_BYTES {
            bail!(
                "rank 0 sent an NCCL unique id of {} bytes, expected {NCCL_ID_BYTES}",
                root_id.len()
            );
        }
        let id = Id::uninit(std::array::from_fn(|i| root_id[i] as c_char));

        Comm::from_rank(stream, rank, world, id).map_err(|e| nccl_error("ncclCommInitRank", e))
    }

    /// The device the collectives run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `collective` on `t` (any layout) and returns its result as a new tensor.
    fn run(&self, t: &Tensor, collective: Collective) -> Result<Tensor> {
        if !t.device().same_device(&self.device) {
            bail!(
                "{}: the tensor is on {:?}, not on the communicator's device {:?}",
                collective.name(),
                t.device().location(),
                self.device.location()
            );
        }
        if t.elem_count() == 0 {
            return Ok(t.clone());
        }
        let t = t.contiguous()?;
        let comm = self.lock()?;
        // NCCL enqueues on the comm's device whatever thread calls; cudarc's event
        // bookkeeping around the call uses the context current on this thread.
        comm.0
            .context()
            .bind_to_thread()
            .context("binding the CUDA context to this thread")?;
        let out = t.apply_op1_no_bwd(&NcclOp {
            comm: &comm.0,
            collective,
        })?;
        Ok(out)
    }

    /// The NCCL communicator, one caller at a time.
    fn lock(&self) -> Result<MutexGuard<'_, RankComm>> {
        self.nccl
            .lock()
            .map_err(|_| anyhow!("a thread panicked inside an NCCL collective of this rank"))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Collective::AllReduceSum)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world {
            bail!(
                "broadcast from rank {root} in a world of {} ranks",
                self.world
            );
        }
        // `new` checked that the world, hence the root, fits NCCL's C int.
        let root = i32::try_from(root)?;
        self.run(t, Collective::Broadcast { root })
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather_bytes(bytes)
    }

    fn barrier(&self) -> Result<()> {
        self.control.barrier()
    }

    fn abort(&self, message: &str) {
        self.control.abort(message)
    }
}

/// Which NCCL collective an [`NcclOp`] runs.
#[derive(Clone, Copy, Debug)]
enum Collective {
    /// `ncclAllReduce` with `ncclSum`.
    AllReduceSum,
    /// `ncclBroadcast` from rank `root`.
    Broadcast { root: i32 },
}

impl Collective {
    /// The op's name in errors.
    fn name(self) -> &'static str {
        match self {
            Collective::AllReduceSum => "nccl_all_reduce_sum",
            Collective::Broadcast { .. } => "nccl_broadcast",
        }
    }
}

/// A collective as a candle custom op: `cuda_fwd` hands the tensor's CUDA buffer to NCCL
/// and wraps the freshly allocated output buffer as the result's storage.
struct NcclOp<'a> {
    comm: &'a Comm,
    collective: Collective,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        self.collective.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: NCCL needs CUDA tensors, got a CPU tensor", self.name())
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the tensor must be contiguous", self.name())
        };
        let range = start..end;
        let device = &storage.device;
        let out = match &storage.slice {
            CudaStorageSlice::F32(s) => self.launch(s, range, device)?,
            CudaStorageSlice::BF16(s) => self.launch(s, range, device)?,
            CudaStorageSlice::F16(s) => self.launch(s, range, device)?,
            CudaStorageSlice::F64(s) => self.launch(s, range, device)?,
            CudaStorageSlice::U8(s) => self.launch(s, range, device)?,
            CudaStorageSlice::U32(s) => self.launch(s, range, device)?,
            CudaStorageSlice::I32(s) => self.launch(s, range, device)?,
            CudaStorageSlice::I64(s) => self.launch(s, range, device)?,
            _ => candle_core::bail!("{}: NCCL has no {:?} type", self.name(), storage.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }
}

impl NcclOp<'_> {
    /// Enqueues the collective on the elements `range` of `src` into a new buffer.
    fn launch<T: NcclType + DeviceRepr + CudaDType>(
        &self,
        src: &CudaSlice<T>,
        range: Range<usize>,
        device: &CudaDevice,
    ) -> candle_core::Result<CudaStorage> {
        let src = src.try_slice(range.clone()).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "{}: elements {range:?} lie outside the tensor's buffer of {}",
                self.name(),
                src.len()
            ))
        })?;
        // SAFETY: the buffer is left uninitialised only until the collective, enqueued just
        // below on the same stream, overwrites all of it; nothing reads it before (it is not
        // shared yet) and on an error it is dropped unread.
        let mut dst = unsafe { device.alloc::<T>(range.len()) }?;
        let status = match self.collective {
            Collective::AllReduceSum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            // Only the root reads its send buffer; every rank has a tensor of the shape.
            Collective::Broadcast { root } => self.comm.broadcast(Some(&src), &mut dst, root),
        };
        status.map_err(|e| candle_core::Error::msg(nccl_error(self.name(), e)))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, device.clone()))
    }
}

/// An NCCL failure as a message (`NcclError`'s own `Debug` omits the result code).
fn nccl_error(call: &str, e: NcclError) -> anyhow::Error {
    anyhow!("{call} failed: {:?}", e.0)
}
