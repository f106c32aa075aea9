//! What BSFA's CPU fast path (the projection kernel in `projection`)
//! share: a tensor's f32 data read in place, and the column chunk they split a row into for
//! rayon. (`crate::cpu_kernels` serves candle custom ops, which see storages, not tensors.)

use super::quant;
use candle_core::Tensor;

/// Columns per parallel chunk of the CPU kernels: a multiple of the 4-bit group, so that a
/// chunk of a 4-bit row starts on a group boundary.
pub(super) const CHUNK: usize = 64 * quant::GROUP;

/// Runs `f` on the contiguous f32 data of a CPU tensor (None for other devices, types or
/// layouts).
pub(super) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>().ok()?;
            let (start, end) = layout.contiguous_offsets()?;
            Some(f(&data[start..end]))
        }
        _ => None,
    }
}
