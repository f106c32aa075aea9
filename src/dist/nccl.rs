//! [`NcclCommunicator`]: the collectives of GPU data parallelism on CUDA tensors through
//! NCCL, one process (rank) per GPU.
//!
//! NCCL moves the tensors; a CPU [`Communicator`] of the same ranks (the control channel)
//! carries the NCCL bootstrap (rank 0's unique id), the small byte messages, barriers and
//! aborts. The collectives are enqueued on the CUDA stream of the candle device the
//! communicator was made for, the stream candle runs every kernel of that device on, so
//! they are ordered with the computation that produces and consumes their tensors without
//! any host synchronisation. That stream must be an explicit one (`device::open_cuda`),
//! never a default stream: NCCL enqueues from a thread of its own (see `join`).
//!
//! No wait on NCCL is unbounded. The communicator is non-blocking (`ncclConfig_t::blocking
//! = 0`): its initialisation and every call return at once and go on in the background,
//! and this rank polls `ncclCommGetAsyncError` for the outcome. The initialisation, and the
//! wait of [`Communicator::barrier`] for the stream to run everything enqueued before it,
//! poll in rounds with the other ranks through the control channel (`dist::lockstep`),
//! bounded by the job's `--dist-timeout`, so a rank that fails, hangs, dies or (while
//! initialising) receives SIGINT or SIGTERM stops every rank within moments, with an error
//! naming it. After any NCCL error, timeout or peer failure this rank aborts its
//! communicator (`ncclCommAbort`), which also ends collectives stuck on the GPU waiting for
//! a rank that is gone; a communicator that is idle and healthy when dropped is destroyed.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
};
use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::{sys, NcclType};

use super::lockstep::Wait;
use super::{caused_by_peer, Communicator};

/// Bytes in an NCCL unique id (`ncclUniqueId::internal`).
const NCCL_ID_BYTES: usize = 128;

/// `NCCL_VERSION(2, 30, 0)`: the release whose `ncclConfig_t` layout cudarc's bindings
/// have (its `nccl` feature selects them). NCCL reads only the fields that both this
/// version and its own know, so older and newer libraries accept the config.
const CONFIG_VERSION: c_uint = 2 * 10000 + 30 * 100;

/// `cudaStreamPerThread`, the largest default-stream handle (0 and 1 are the legacy one).
const PER_THREAD_STREAM: usize = 2;

/// Pause between polls while NCCL finishes enqueueing a collective in the background:
/// usually it has finished by the first poll, except when a first collective connects the
/// ranks.
const ENQUEUE_POLL: Duration = Duration::from_millis(1);

/// A [`Communicator`] whose tensor collectives run on CUDA tensors through NCCL, and whose
/// byte messages, barriers and aborts go through a CPU control communicator.
///
/// Tensors passed to [`Communicator::all_reduce_sum`] and [`Communicator::broadcast`] must
/// live on the device given to [`NcclCommunicator::new`] (the same candle device, hence the
/// same CUDA stream); the supported dtypes are f32, bf16, f16, f64, u8, u32, i32 and i64.
/// The results are new tensors; the work is only enqueued on the device's stream.
/// [`Communicator::barrier`] also waits, within the timeout, until every rank's stream has
/// run what was enqueued on it before.
pub struct NcclCommunicator {
    // Dropped first: destroying or aborting the NCCL communicator never needs the control
    // channel.
    nccl: Mutex<RankComm>,
    control: Box<dyn Communicator>,
    device: Device,
    timeout: Duration,
    rank: usize,
    world: usize,
}

impl NcclCommunicator {
    /// Joins the NCCL communicator of all `control.world()` ranks on the CUDA device of
    /// `device`, as rank `control.rank()`.
    ///
    /// `control` is an already connected CPU communicator of the same ranks: rank 0 makes
    /// the NCCL unique id and shares it through `control.all_gather_bytes`, then every rank
    /// starts NCCL's initialisation and waits, in rounds with the others, until it has
    /// finished on every rank. `timeout` (`--dist-timeout`) bounds that wait, each
    /// [`Communicator::barrier`]'s, and NCCL's enqueueing of each collective. Every rank
    /// must call this at the same point, each with its own GPU. On an error this rank
    /// aborts its NCCL communicator and tells the others through `control.abort`.
    pub fn new(control: Box<dyn Communicator>, device: &Device, timeout: Duration) -> Result<Self> {
        match join(&*control, device, timeout) {
            Ok(comm) => Ok(Self {
                nccl: Mutex::new(comm),
                rank: control.rank(),
                world: control.world(),
                control,
                device: device.clone(),
                timeout,
            }),
            Err(e) => Err(failed(&*control, "joining NCCL", e)),
        }
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
        let mut comm = self.lock()?;
        // NCCL enqueues on the comm's device whatever thread calls; cudarc's event
        // bookkeeping around the call uses the context current on this thread.
        comm.stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context to this thread")?;
        let out = t.apply_op1_no_bwd(&NcclOp {
            comm: RefCell::new(&mut comm),
            collective,
            timeout: self.timeout,
        });
        match out {
            Ok(out) => Ok(out),
            // NCCL failed (not a bad argument): the communicator is aborted, the peers must know.
            Err(e) if comm.aborted.is_some() => {
                Err(failed(&*self.control, collective.name(), e.into()))
            }
            Err(e) => Err(e.into()),
        }
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
        let root = c_int::try_from(root)?;
        self.run(t, Collective::Broadcast { root })
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather_bytes(bytes)
    }

    /// Waits, in rounds with the other ranks and within the timeout, until every rank's
    /// stream has run what was enqueued on it before the barrier (collectives included)
    /// without an NCCL error; then every rank has called it. On a failure anywhere the
    /// NCCL communicator is aborted.
    fn barrier(&self) -> Result<()> {
        let mut comm = self.lock()?;
        let wait = Wait {
            phase: "the CUDA work enqueued before the barrier",
            timeout: self.timeout,
            interruptible: false,
        };
        let outcome = comm
            .stream
            .record_event(None)
            .context("recording the CUDA stream's work")
            .and_then(|marker| wait.run(&*self.control, || comm.idle(&marker)));
        if let Err(e) = outcome {
            comm.abort(format!("{e:#}"));
            return Err(failed(&*self.control, "barrier", e));
        }
        Ok(())
    }

    fn abort(&self, message: &str) {
        self.control.abort(message);
        // This rank is stopping: its collectives in flight will never be matched. Best
        // effort, like the rest of `abort`: a thread inside a collective keeps the lock.
        if let Ok(mut comm) = self.nccl.try_lock() {
            comm.abort(format!("this rank aborted: {message}"));
        }
    }
}

/// The NCCL bootstrap: share rank 0's unique id, then initialise this rank's communicator
/// in rounds with the other ranks.
fn join(control: &dyn Communicator, device: &Device, timeout: Duration) -> Result<RankComm> {
    let (rank, world) = (control.rank(), control.world());
    if rank >= world {
        bail!("rank {rank} is outside a world of {world} ranks");
    }
    // NCCL counts ranks in C ints.
    let nranks = c_int::try_from(world).context("too many ranks for NCCL")?;
    let cuda = device
        .as_cuda_device()
        .context("NCCL collectives need a CUDA device")?;
    let stream = cuda.cuda_stream();
    // A default stream means each thread's own; NCCL enqueues from a thread of its own.
    if (stream.cu_stream() as usize) <= PER_THREAD_STREAM {
        bail!("NCCL needs a device on a stream of its own (device::open_cuda, not new_cuda)");
    }
    // ncclGetUniqueId and ncclCommInitRankConfig work on the device current on this thread.
    stream
        .context()
        .bind_to_thread()
        .context("binding the CUDA context to this thread")?;
    let id = share_unique_id(control)?;
    let mut comm = RankComm::start(stream, nranks, rank as c_int, id)?;
    let init = Wait {
        phase: "NCCL initialisation",
        timeout,
        interruptible: true,
    };
    let outcome = init.run(control, || comm.ready());
    if let Err(e) = outcome {
        comm.abort(format!("{e:#}"));
        return Err(e);
    }
    Ok(comm)
}

/// Rank 0's NCCL unique id, made there and shared with every rank through `control`.
fn share_unique_id(control: &dyn Communicator) -> Result<sys::ncclUniqueId> {
    let mine = if control.rank() == 0 {
        let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        id.internal.iter().map(|&c| c as u8).collect()
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
    Ok(sys::ncclUniqueId {
        internal: std::array::from_fn(|i| root_id[i] as c_char),
    })
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` (every setting "undefined": NCCL's default or its
/// environment variable) with `blocking = 0`: every NCCL call then returns at once, and the
/// caller polls `ncclCommGetAsyncError` until it is done.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN;
    const UNDEF_PTR: *const c_char = std::ptr::null();
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: UNDEF_PTR,
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: UNDEF_PTR,
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// Tells the other ranks through `control` that this rank failed in `phase` with `e`,
/// unless `e` is another rank's failure (they know already), and names this rank and the
/// phase in the error.
fn failed(control: &dyn Communicator, phase: &str, e: anyhow::Error) -> anyhow::Error {
    if !caused_by_peer(&e) {
        control.abort(&format!("{phase}: {e:#}"));
    }
    e.context(format!(
        "rank {} of {}: {phase}",
        control.rank(),
        control.world()
    ))
}

/// This rank's NCCL communicator, held raw rather than as cudarc's `Comm`, whose `Drop`
/// panics when aborting fails and which cannot be made non-blocking.
struct RankComm {
    comm: sys::ncclComm_t,
    /// The candle device's stream: every collective runs on it.
    stream: Arc<CudaStream>,
    /// Why the communicator was aborted; once set, `comm` is freed and every use fails.
    aborted: Option<String>,
}

// SAFETY: an NCCL communicator (`ncclComm_t`, a raw pointer) is not tied to the thread that
// created it: NCCL only forbids concurrent calls on one communicator. A `RankComm` is not
// `Sync`, and `NcclCommunicator` keeps it in a `Mutex`, so its calls come one at a time
// whichever thread makes them (dropping included). The other fields are `Send`.
unsafe impl Send for RankComm {}

impl RankComm {
    /// Starts this rank's non-blocking NCCL initialisation on the device of `stream` (its
    /// CUDA context must be current on this thread); [`RankComm::ready`] tells when it has
    /// finished.
    fn start(
        stream: Arc<CudaStream>,
        nranks: c_int,
        rank: c_int,
        id: sys::ncclUniqueId,
    ) -> Result<Self> {
        let mut config = non_blocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for writes and reads during the call, which
        // copies the config before it returns and stores the new communicator in `comm`.
        let started =
            unsafe { result::comm_init_rank_config(&mut comm, nranks, id, rank, &mut config) }
                .map_err(|e| nccl_error("ncclCommInitRankConfig", e));
        if comm.is_null() {
            return Err(started
                .err()
                .unwrap_or_else(|| anyhow!("ncclCommInitRankConfig made no communicator")));
        }
        // On an error, dropping the communicator aborts it (its asynchronous state is the
        // error, so it is not healthy).
        let comm = Self {
            comm,
            stream,
            aborted: None,
        };
        started?;
        Ok(comm)
    }

    /// The communicator, unless it was aborted.
    fn live(&self) -> Result<sys::ncclComm_t> {
        match &self.aborted {
            Some(why) => bail!("this rank's NCCL communicator was aborted after: {why}"),
            None => Ok(self.comm),
        }
    }

    /// Whether NCCL has finished everything asked of it so far (`ncclCommGetAsyncError` is
    /// `ncclSuccess`, not `ncclInProgress`); an error once it reports one.
    fn ready(&self) -> Result<bool> {
        let comm = self.live()?;
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a communicator NCCL made and nobody aborted or destroyed (`live`
        // checks), and `state` is valid for the write.
        let queried = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        queried
            .result()
            .map_err(|e| nccl_error("ncclCommGetAsyncError", e))?;
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            error => bail!("NCCL reported {error:?} (NCCL_DEBUG=WARN prints its reason)"),
        }
    }

    /// Whether the stream has run everything recorded in `marker`, with NCCL reporting no
    /// error.
    fn idle(&self, marker: &CudaEvent) -> Result<bool> {
        Ok(self.ready()?
            && marker
                .try_is_complete()
                .context("querying the CUDA stream")?)
    }

    /// Makes one NCCL call that enqueues work on the stream (`call` gets the communicator
    /// and the stream), then waits, up to `timeout`, until NCCL has enqueued it: a
    /// non-blocking communicator may answer `ncclInProgress` and go on in the background.
    /// Any failure aborts the communicator.
    fn enqueue(
        &mut self,
        name: &str,
        timeout: Duration,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        let comm = self.live()?;
        let outcome = call(comm, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_error(name, e))
            .and_then(|_| self.settle(name, timeout));
        if let Err(e) = &outcome {
            self.abort(format!("{e:#}"));
        }
        outcome
    }

    /// Polls until NCCL has finished the calls in progress, up to `timeout`.
    fn settle(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.ready().with_context(|| format!("after {name}"))? {
            if Instant::now() >= deadline {
                bail!(
                    "NCCL was still enqueueing {name} after {} s; raise --dist-timeout if it \
                     needs longer, otherwise a peer is stuck",
                    timeout.as_secs_f64()
                );
            }
            sleep(ENQUEUE_POLL);
        }
        Ok(())
    }

    /// Aborts the communicator, once: NCCL stops its work, on the GPU too, and frees it.
    /// A failure is only reported on stderr: aborting is already the way out.
    fn abort(&mut self, why: String) {
        if self.aborted.is_some() {
            return;
        }
        // SAFETY: `comm` is a communicator NCCL made, not yet aborted or destroyed, and never
        // used again: `aborted` is set below.
        if let Err(e) = unsafe { result::comm_abort(self.comm) } {
            eprintln!("warning: ncclCommAbort failed: {:?}", e.0);
        }
        self.aborted = Some(why);
    }
}

impl Drop for RankComm {
    /// Never panics. Destroying waits for the communicator's outstanding work, which never
    /// ends if a peer is gone, so only an idle communicator without errors is destroyed;
    /// any other is aborted.
    fn drop(&mut self) {
        if self.aborted.is_some() {
            return;
        }
        let idle = self
            .stream
            .record_event(None)
            .map_err(anyhow::Error::from)
            .and_then(|marker| self.idle(&marker));
        if !matches!(idle, Ok(true)) {
            self.abort("dropped while busy or failed".into());
            return;
        }
        // SAFETY: `comm` is a communicator NCCL made, not aborted or destroyed, and never
        // used again: `self` is being dropped.
        if let Err(e) = unsafe { result::comm_destroy(self.comm) } {
            eprintln!("warning: ncclCommDestroy failed: {:?}", e.0);
        }
    }
}

/// Which NCCL collective an [`NcclOp`] runs.
#[derive(Clone, Copy, Debug)]
enum Collective {
    /// `ncclAllReduce` with `ncclSum`.
    AllReduceSum,
    /// `ncclBroadcast` from rank `root`.
    Broadcast { root: c_int },
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
    // A `RefCell` because candle passes custom ops by shared reference.
    comm: RefCell<&'a mut RankComm>,
    collective: Collective,
    timeout: Duration,
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
        self.enqueue(&src, &mut dst)
            .map_err(|e| candle_core::Error::msg(format!("{e:#}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, device.clone()))
    }

    /// Has NCCL enqueue the collective from `src` into `dst` (of the same length).
    fn enqueue<T: NcclType>(&self, src: &CudaView<'_, T>, dst: &mut CudaSlice<T>) -> Result<()> {
        let mut comm = self.comm.borrow_mut();
        let stream = Arc::clone(&comm.stream);
        // The guards let cudarc order later uses of the buffers after the collective; they
        // are dropped once NCCL has enqueued it.
        let (src_ptr, _src_read) = src.device_ptr(&stream);
        let (dst_ptr, _dst_written) = dst.device_ptr_mut(&stream);
        let (count, datatype) = (src.len(), T::as_nccl_type());
        // SAFETY (both calls): `src_ptr` and `dst_ptr` address `count` elements of `T`
        // (`datatype`) in buffers on the communicator's device, which outlive the
        // collective: freeing them is ordered after it on the same stream (cudarc frees
        // with `cuMemFreeAsync` there, or synchronises the stream first).
        match self.collective {
            Collective::AllReduceSum => {
                comm.enqueue("ncclAllReduce", self.timeout, |nccl, s| unsafe {
                    let op = sys::ncclRedOp_t::ncclSum;
                    result::all_reduce(src_ptr as _, dst_ptr as _, count, datatype, op, nccl, s)
                })
            }
            // Only the root reads its send buffer; every rank has a tensor of the shape.
            Collective::Broadcast { root } => {
                comm.enqueue("ncclBroadcast", self.timeout, |nccl, s| unsafe {
                    result::broadcast(src_ptr as _, dst_ptr as _, count, datatype, root, nccl, s)
                })
            }
        }
    }
}

/// An NCCL failure as a message (`NcclError`'s own `Debug` omits the result code).
fn nccl_error(call: &str, e: NcclError) -> anyhow::Error {
    anyhow!("{call} failed: {:?}", e.0)
}
