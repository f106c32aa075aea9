//! Helpers shared by the fused CPU kernels of the model ops: gemm wrappers, the fixed
//! chunking of rows, shape checks and shared access to CPU buffers.
//!
//! Matrices are row-major unless given with explicit row and column strides (in elements).

use crate::cpu_kernels::{last_dim, slice, Elem};
use candle_core::{bail, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per chunk. Kernels that sum over rows add up fixed chunks of rows in order, so the
/// result is bitwise the same for any thread count and scheduling (rayon's `reduce` tree is
/// not); causal attention multiplies a chunk of query rows only against the keys at or before
/// its last row, skipping most of the masked upper triangle.
pub(super) const CHUNK_ROWS: usize = 64;

/// Row chunks of `rows` rows, each [`CHUNK_ROWS`] long but the last.
pub(super) fn row_chunks(rows: usize) -> impl Iterator<Item = Range<usize>> {
    (0..rows)
        .step_by(CHUNK_ROWS)
        .map(move |first| first..(first + CHUNK_ROWS).min(rows))
}

/// A `width`-long sum over `rows` rows: `add` adds the rows of one chunk into a zeroed
/// accumulator, chunks run in parallel, and their sums are added in chunk order.
pub(super) fn sum_over_chunks<T: Elem>(
    rows: usize,
    width: usize,
    add: impl Fn(Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let chunks: Vec<Range<usize>> = row_chunks(rows).collect();
    let partials: Vec<Vec<T>> = chunks
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![T::zero(); width];
            add(chunk, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![T::zero(); width];
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
    total
}

/// Fails unless the rows of `xl` are as long as the parameter vector `params`.
pub(super) fn check_row(name: &str, xl: &Layout, params: &Layout) -> Result<()> {
    if last_dim(xl) != params.shape().elem_count() {
        bail!(
            "{name}: weight has {} elements, rows have {}",
            params.shape().elem_count(),
            last_dim(xl)
        );
    }
    Ok(())
}

/// Borrow the CPU slice of a tensor held by an op (rotary tables, targets, gradients).
pub(super) fn with_cpu_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        candle_core::Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => bail!("fused op: every input must be on the CPU"),
    }
}

/// A pointer that tasks on other threads may write through; each task writes only its
/// own disjoint region.
#[derive(Clone, Copy)]
pub(super) struct SharedMut<T>(pub(super) *mut T);
// SAFETY: the kernels hand each task a disjoint set of strided rows.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer. A method, so closures capture the `Send` wrapper, not its raw field.
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

/// A strided matrix operand: pointer to its first element, row stride, column stride.
pub(super) type Strided<T> = (*const T, usize, usize);

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, `dst` with row stride `dst_rs`.
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes.
unsafe fn gemm_strided<T: Elem + 'static>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): Strided<T>,
    (rhs, rhs_rs, rhs_cs): Strided<T>,
    parallelism: gemm::Parallelism,
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
        parallelism,
    )
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` on the calling thread, `dst` with row
/// stride `dst_rs`.
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes.
pub(super) unsafe fn small_gemm<T: Elem + 'static>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Strided<T>,
    rhs: Strided<T>,
) {
    gemm_strided(
        dims,
        (dst, dst_rs),
        accumulate,
        lhs,
        rhs,
        gemm::Parallelism::None,
    )
}

/// [`small_gemm`] on slices, `dst` row-major `m x n`; panics where a strided operand would
/// reach past its slice.
pub(super) fn gemm_into<T: Elem + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the assertions above keep every strided access inside the slices.
    unsafe {
        small_gemm(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            accumulate,
            (lhs.as_ptr(), lhs_rs, lhs_cs),
            (rhs.as_ptr(), rhs_rs, rhs_cs),
        )
    }
}

/// `x (rows x inp) @ w^T` for `w` of shape `out x inp`, on all of candle's threads; `w` is
/// read transposed in place.
pub(super) fn x_times_w_t<T: Elem + 'static>(
    x: &[T],
    w: &[T],
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<T> {
    assert!(x.len() >= rows * inp && w.len() >= out * inp);
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
        gemm_strided(
            (rows, out, inp),
            (y.as_mut_ptr(), out),
            false,
            (x.as_ptr(), inp, 1),
            (w.as_ptr(), 1, inp),
            parallelism,
        )
    };
    y
}
