//! A training step's peak device memory, measured where there is no GPU: one micro-batch's
//! forward and backward of the run's model run on the CPU with the ops a GPU runs
//! (`train.kernels = reference`) in the run's dtype, while a counting allocator records the
//! heap's peak above what was live before. Every tensor of those ops is one allocation of
//! its size on either device, so the CPU's peak is the GPU's, less what CUDA adds (its
//! context, cuBLAS workspace, the allocator's rounding and fragmentation: see
//! [`CUDA_RUNTIME_BYTES`]).
//!
//! Measuring the whole model at the run's micro-batch would take minutes on a CPU; instead
//! the peak is measured at the run's sequence length for 1 and 2 layers and micro-batches 2
//! and 3, and extrapolated as `a + b B + c L + d B L`: the activations kept for the backward
//! grow with layers and sequences, the head's with sequences, the gradients with layers.
//! (Micro-batch 1 is left out: some of candle's ops copy a lone sequence differently.) A
//! first, discarded measurement takes the allocations that outlive it (thread-local
//! buffers, lazily built tables): on a small LLaMA they doubled the first reading.

use crate::config::RunConfig;
use anyhow::{bail, Result};
use candle_core::Device;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Instant;

/// A heap whose growth can be counted: what [`StepPeak`] measures with.
pub trait Heap: Sync {
    /// Starts counting from zero at the bytes live now.
    fn start(&self);
    /// Stops counting; returns the largest growth in live bytes since [`Heap::start`].
    fn stop(&self) -> usize;
}

/// An allocator that counts live bytes and their peak while switched on, and costs one
/// relaxed load per call while off: training need not pay two atomic updates (one a
/// compare-and-swap loop) on every allocation. The binary's global allocator, around
/// mimalloc.
pub struct CountingAlloc<A> {
    inner: A,
    on: AtomicBool,
    live: AtomicIsize,
    peak: AtomicIsize,
}

impl<A> CountingAlloc<A> {
    /// `inner`, not counting.
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            on: AtomicBool::new(false),
            live: AtomicIsize::new(0),
            peak: AtomicIsize::new(0),
        }
    }

    fn grew(&self, bytes: usize) {
        if self.on.load(Ordering::Relaxed) {
            let live = self.live.fetch_add(bytes as isize, Ordering::Relaxed) + bytes as isize;
            self.peak.fetch_max(live, Ordering::Relaxed);
        }
    }

    fn shrank(&self, bytes: usize) {
        if self.on.load(Ordering::Relaxed) {
            self.live.fetch_sub(bytes as isize, Ordering::Relaxed);
        }
    }
}

impl<A: Sync> Heap for CountingAlloc<A> {
    fn start(&self) {
        self.live.store(0, Ordering::SeqCst);
        self.peak.store(0, Ordering::SeqCst);
        self.on.store(true, Ordering::SeqCst);
    }

    fn stop(&self) -> usize {
        self.on.store(false, Ordering::SeqCst);
        self.peak.load(Ordering::SeqCst).max(0) as usize
    }
}

// SAFETY: every call is passed to `inner` unchanged; only counters are updated around it.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.grew(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.grew(layout.size());
        // SAFETY: as above.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.shrank(layout.size());
        // SAFETY: as above.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.grew(new_size);
        self.shrank(layout.size());
        // SAFETY: as above.
        unsafe { self.inner.realloc(ptr, layout, new_size) }
    }
}

/// What a CUDA process holds beyond its tensors: its context and cuBLAS workspace (about
/// 1 GiB on an H100 with CUDA 12-13), a margin the prediction adds.
pub const CUDA_RUNTIME_BYTES: f64 = (1u64 << 30) as f64;

/// Depths and micro-batches measured.
const LAYERS: [usize; 2] = [1, 2];
const MICRO_BATCHES: [usize; 2] = [2, 3];

/// The bytes one micro-batch's forward and backward hold at their peak beyond the weights,
/// as a function of depth `L` and micro-batch `B`: `a + b B + c L + d B L`.
#[derive(Debug, Clone, Copy)]
pub struct StepPeak {
    coefficients: [f64; 4],
    /// Seconds the measurements took.
    pub seconds: f64,
}

impl StepPeak {
    /// Measures `config`'s model (its dtype as given; `auto` as on a GPU) at its sequence
    /// length; `heap` is the process's counting allocator.
    pub fn measure(config: &RunConfig, heap: &dyn Heap) -> Result<Self> {
        let started = Instant::now();
        // Once to warm up: the first forward and backward also allocates what lives on
        // (thread-local buffers, lazily built tables), which is not the step's.
        measure_one(config, LAYERS[0], MICRO_BATCHES[0], heap)?;
        // Each point twice, keeping the lower reading: what another thread allocates during a
        // reading (a worker's first scratch buffer) only ever adds to it, and the fit below
        // multiplies such an error (25 times at 6 layers and 7 sequences).
        let mut m = [[0.0; 2]; 2];
        for (i, &layers) in LAYERS.iter().enumerate() {
            for (j, &micro_batch) in MICRO_BATCHES.iter().enumerate() {
                let first = measure_one(config, layers, micro_batch, heap)?;
                let second = measure_one(config, layers, micro_batch, heap)?;
                m[i][j] = first.min(second) as f64;
            }
        }
        // m[i][j] = a + b B_j + c L_i + d B_j L_i with L = 1, 2 and B = 2, 3.
        let slope_1 = m[0][1] - m[0][0]; // b + d
        let slope_2 = m[1][1] - m[1][0]; // b + 2d
        let d = slope_2 - slope_1;
        let b = slope_1 - d;
        let c = (m[1][0] - m[0][0]) - 2.0 * d;
        let a = m[0][0] - 2.0 * b - c - 2.0 * d;
        Ok(Self {
            coefficients: [a, b, c, d],
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Predicted bytes at `layers` and `micro_batch`.
    pub fn bytes(&self, layers: usize, micro_batch: usize) -> f64 {
        let [a, b, c, d] = self.coefficients;
        let (l, m) = (layers as f64, micro_batch as f64);
        a + b * m + c * l + d * m * l
    }

    /// Bytes each further sequence of the micro-batch adds at `layers`.
    pub fn per_sequence(&self, layers: usize) -> f64 {
        self.coefficients[1] + self.coefficients[3] * layers as f64
    }
}

/// The heap's peak above its level at the start, over one forward and backward of
/// `config`'s model cut to `layers` layers, on `micro_batch` sequences (or images), with
/// the ops a GPU runs. Nothing else may compute in the process meanwhile: the kernels
/// switch is process-wide, and the allocator counts every thread.
pub fn measure_one(
    config: &RunConfig,
    layers: usize,
    micro_batch: usize,
    heap: &dyn Heap,
) -> Result<usize> {
    crate::cpu_kernels::set_reference_only(true);
    let peak = step_peak(config, layers, micro_batch, heap);
    crate::cpu_kernels::set_reference_only(false);
    peak
}

/// [`measure_one`] once the reference ops are on.
fn step_peak(
    config: &RunConfig,
    layers: usize,
    micro_batch: usize,
    heap: &dyn Heap,
) -> Result<usize> {
    let spec = config.spec().with_layers(layers);
    let precision = config.precision_on(true);
    let cpu = &Device::Cpu;
    let (model, _) = spec.build(config.train.seed, precision, cpu)?;
    let (inputs, targets) = spec.probe_batch(micro_batch, config.train.seq_len, cpu)?;
    heap.start();
    let grads = model
        .loss(&inputs, &targets)
        .and_then(|loss| Ok(loss.backward()?));
    let peak = heap.stop();
    drop(grads?);
    if peak == 0 {
        bail!("the heap's peak reads 0: this process's global allocator is not the counting one");
    }
    Ok(peak)
}
