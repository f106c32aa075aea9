//! A block's update history: its last `bsfa.history` updates, `numel` values each.
//!
//! In full precision it is one `capacity x numel` matrix, allocated at the first update and
//! written one row per step in place, cycling over the rows (a ring): a re-estimation reads
//! it as it lies, with no copy, since the estimate does not depend on the order of the rows
//! (`pca`). Joining separate rows instead cost a copy of the whole history and a launch per
//! row on a GPU at every re-estimation (docs/gpu.md). In 4-bit it is a queue of encoded rows,
//! oldest first. Either way a checkpoint holds the rows oldest first.
//!
//! A ring also keeps the Gram matrix of its rows between re-estimations, in products of a
//! group of rows (`bsfa.interval` of them, the rows written between two re-estimations)
//! with the whole ring (`group x capacity`, always that shape, unwritten rows zero). A
//! re-estimation computes only the products of groups written since the last one (at the
//! paper's settings one of six, so the Gram matrix costs a sixth of its multiply-adds and
//! about half its memory traffic), and each entry is read from the product of the more
//! recently written of its two rows' groups, which was computed with both rows in place.
//! After a resume every group's product is computed afresh, from the same rows in the same
//! slots and with the same shapes, so it holds the same values and a resumed run stays
//! bit-identical (a matrix product's entry depends on its row and column alone).

use super::state::Stored;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::VecDeque;

/// The updates a block keeps (see the module doc).
pub(super) enum History {
    /// Full precision: `None` until the first update.
    Ring(Option<Ring>),
    /// 4-bit rows (`1 x numel` each), oldest first.
    Rows(VecDeque<Stored>),
}

/// A `capacity x numel` matrix whose first `min(count, capacity)` rows hold updates; row
/// `count % capacity` is written next (once all rows hold updates, it holds the oldest).
pub(super) struct Ring {
    matrix: Tensor,
    capacity: usize,
    /// Updates recorded in all, by this run and the runs it resumes.
    count: u64,
    /// Rows per group of the Gram matrix's products.
    group: usize,
    /// Per group: its latest product, if any.
    products: Vec<Option<Product>>,
}

/// A group's rows times every row of the ring (`rows x capacity`, f64, row-major), computed
/// when the group's latest update was the `version`-th.
struct Product {
    version: u64,
    values: Vec<f64>,
}

impl History {
    /// No updates yet, kept at `bits` precision.
    pub(super) fn new(bits: usize) -> Self {
        if bits == 32 {
            Self::Ring(None)
        } else {
            Self::Rows(VecDeque::new())
        }
    }

    /// Appends `update` (flat), dropping the oldest once `capacity` updates are held; a ring
    /// keeps its Gram matrix in products of `group` rows (`bsfa.interval`).
    pub(super) fn record(&mut self, update: &Tensor, capacity: usize, group: usize) -> Result<()> {
        let row = update.reshape((1, update.elem_count()))?;
        match self {
            Self::Ring(ring) => {
                let ring = match ring {
                    Some(ring) => ring,
                    None => ring.insert(Ring::new(&row, capacity, group, 0)?),
                };
                ring.matrix.slice_set(&row.contiguous()?, 0, ring.next())?;
                ring.count += 1;
            }
            Self::Rows(rows) => {
                if rows.len() == capacity {
                    rows.pop_front();
                }
                rows.push_back(Stored::keep(&row, 4)?);
            }
        }
        Ok(())
    }

    /// The updates as one `len x numel` matrix, its rows in any order (`None` before the
    /// first): a view of the ring, or the 4-bit rows decoded.
    pub(super) fn matrix(&self) -> Result<Option<Tensor>> {
        match self {
            Self::Ring(None) => Ok(None),
            Self::Ring(Some(ring)) => Ok(Some(ring.matrix.narrow(0, 0, ring.len())?)),
            Self::Rows(_) => self.stacked_rows()?.map(|s| s.matrix()).transpose(),
        }
    }

    /// The full-precision rows (`1 x numel` views), oldest first; `None` for 4-bit rows.
    pub(super) fn full_rows(&self) -> Result<Option<Vec<Tensor>>> {
        let Self::Ring(ring) = self else {
            return Ok(None);
        };
        let Some(ring) = ring else {
            return Ok(Some(Vec::new()));
        };
        let (capacity, len) = (ring.capacity, ring.len());
        let oldest = if len == capacity { ring.next() } else { 0 };
        (0..len)
            .map(|i| Ok(ring.matrix.narrow(0, (oldest + i) % capacity, 1)?))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// The products the Gram matrix of `matrix` (what [`History::matrix`] gave) needs
    /// computed now, where the history lies (f64, flat): for a ring those of the groups
    /// written since their last product, else the whole `H H^T` (from `matrix`, so 4-bit
    /// rows are decoded once). [`History::gram`] takes their values.
    pub(super) fn gram_parts(&self, matrix: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Ring(Some(ring)) => ring.stale_products(),
            _ => Ok(vec![super::pca::gram_product(matrix, matrix)?]),
        }
    }

    /// The Gram matrix of [`History::matrix`]'s rows (`len x len`, row-major), from the
    /// values of [`History::gram_parts`], in their order.
    pub(super) fn gram(&mut self, parts: Vec<Vec<f64>>) -> Result<Vec<f64>> {
        match self {
            Self::Ring(Some(ring)) => ring.gram(parts),
            _ => parts
                .into_iter()
                .next()
                .context("bsfa: no Gram matrix for a history"),
        }
    }

    /// The 4-bit rows as one stored matrix, oldest first (`None` in full precision or
    /// before the first update).
    pub(super) fn stacked_rows(&self) -> Result<Option<Stored>> {
        match self {
            Self::Rows(rows) if !rows.is_empty() => {
                let rows: Vec<&Stored> = rows.iter().collect();
                Ok(Some(Stored::stack(&rows)?))
            }
            _ => Ok(None),
        }
    }

    /// The history a checkpoint holds: `stored` (`rows x numel`, oldest first, `rows <=
    /// capacity`) in the form of [`History::new`]`(bits)`, after `recorded` updates in all,
    /// its Gram matrix in products of `group` rows.
    /// The ring's rows go to the slots the uninterrupted run wrote them to, so that the
    /// estimates sum in the same order and a resumed run stays bit-identical.
    pub(super) fn restore(
        stored: Stored,
        capacity: usize,
        group: usize,
        recorded: u64,
    ) -> Result<Self> {
        match stored {
            Stored::Full(t) => {
                let rows = t.dim(0)?;
                if rows > capacity || rows == 0 {
                    bail!("a history of {rows} rows does not fit {capacity}");
                }
                // Rows fewer than the capacity were written to the first slots.
                let count = if rows == capacity {
                    recorded.max(rows as u64)
                } else {
                    rows as u64
                };
                let first = t.narrow(0, 0, 1)?;
                // A new matrix: the ring is written in place, the checkpoint's tensor is
                // not ours.
                let ring = Ring::new(&first, capacity, group, count)?;
                let oldest = if rows == capacity { ring.next() } else { 0 };
                // Oldest first from slot `oldest` on, wrapping at the end.
                let head = rows.min(capacity - oldest);
                ring.matrix
                    .slice_set(&t.narrow(0, 0, head)?.contiguous()?, 0, oldest)?;
                if head < rows {
                    ring.matrix
                        .slice_set(&t.narrow(0, head, rows - head)?.contiguous()?, 0, 0)?;
                }
                Ok(Self::Ring(Some(ring)))
            }
            stored => Ok(Self::Rows(stored.into_rows()?.into())),
        }
    }

    /// The device of each stored matrix, named `<name>` (the ring) or `<name>[i]` (a row).
    pub(super) fn devices(&self, name: &str) -> Vec<(String, Device)> {
        match self {
            Self::Ring(ring) => ring
                .iter()
                .map(|r| (name.to_string(), r.matrix.device().clone()))
                .collect(),
            Self::Rows(rows) => rows
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("{name}[{i}]"), s.device().clone()))
                .collect(),
        }
    }

    /// Bytes held (the whole ring once allocated).
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::Ring(ring) => ring.as_ref().map_or(0, |r| {
                r.matrix.elem_count() * r.matrix.dtype().size_in_bytes()
            }),
            Self::Rows(rows) => rows.iter().map(Stored::bytes).sum(),
        }
    }
}

impl Ring {
    /// An empty ring of `capacity` rows like `row` (`1 x numel`) that has recorded `count`
    /// updates in all.
    fn new(row: &Tensor, capacity: usize, group: usize, count: u64) -> Result<Self> {
        let group = group.clamp(1, capacity);
        Ok(Self {
            matrix: Tensor::zeros((capacity, row.dim(1)?), row.dtype(), row.device())?,
            capacity,
            count,
            group,
            products: (0..capacity.div_ceil(group)).map(|_| None).collect(),
        })
    }

    /// Rows holding updates.
    fn len(&self) -> usize {
        self.count.min(self.capacity as u64) as usize
    }

    /// The row written next.
    fn next(&self) -> usize {
        (self.count % self.capacity as u64) as usize
    }

    /// The count after the latest update written to group `g` (0: none yet).
    fn version(&self, g: usize) -> u64 {
        let capacity = self.capacity as u64;
        let start = (g * self.group) as u64;
        let end = (start + self.group as u64).min(capacity);
        (start..end)
            .filter(|&slot| slot < self.count)
            // The latest update written to `slot`: the last `t < count` with `t % capacity
            // = slot`.
            .map(|slot| slot + (self.count - 1 - slot) / capacity * capacity + 1)
            .max()
            .unwrap_or(0)
    }

    /// Groups written since their latest product.
    fn stale(&self) -> Vec<usize> {
        (0..self.products.len())
            .filter(|&g| {
                let version = self.version(g);
                version > 0
                    && self.products[g]
                        .as_ref()
                        .is_none_or(|p| p.version != version)
            })
            .collect()
    }

    /// The products of the stale groups: their rows times every row (`rows x capacity`).
    fn stale_products(&self) -> Result<Vec<Tensor>> {
        self.stale()
            .into_iter()
            .map(|g| {
                let start = g * self.group;
                let rows = self.group.min(self.capacity - start);
                super::pca::gram_product(&self.matrix.narrow(0, start, rows)?, &self.matrix)
            })
            .collect()
    }

    /// Takes the values of [`Ring::stale_products`] and assembles the Gram matrix of the
    /// first `len` rows: entry `(i, j)` from the product of the more recently written of
    /// their groups.
    fn gram(&mut self, parts: Vec<Vec<f64>>) -> Result<Vec<f64>> {
        let stale = self.stale();
        if parts.len() != stale.len() {
            bail!(
                "bsfa: {} Gram products for {} groups",
                parts.len(),
                stale.len()
            );
        }
        for (g, values) in stale.into_iter().zip(parts) {
            let version = self.version(g);
            self.products[g] = Some(Product { version, values });
        }
        let (len, capacity) = (self.len(), self.capacity);
        let versions: Vec<u64> = (0..self.products.len()).map(|g| self.version(g)).collect();
        let mut gram = vec![0.0; len * len];
        for i in 0..len {
            for j in 0..len {
                let (gi, gj) = (i / self.group, j / self.group);
                let (g, row, column) = if versions[gi] >= versions[gj] {
                    (gi, i - gi * self.group, j)
                } else {
                    (gj, j - gj * self.group, i)
                };
                let product = self.products[g]
                    .as_ref()
                    .context("bsfa: a Gram product is missing")?;
                gram[i * len + j] = product.values[row * capacity + column];
            }
        }
        Ok(gram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(i: usize) -> Tensor {
        Tensor::new(&[i as f32, 10.0 * i as f32, -(i as f32)], &Device::Cpu).unwrap()
    }

    fn firsts(rows: &[Tensor]) -> Vec<f32> {
        rows.iter()
            .map(|r| r.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
            .collect()
    }

    /// The Gram matrix of `history`, from its parts as a re-estimation takes them.
    fn gram_of(history: &mut History) -> Vec<f64> {
        let parts: Vec<Vec<f64>> = history
            .gram_parts(&history.matrix().unwrap().unwrap())
            .unwrap()
            .iter()
            .map(|p| p.to_vec1().unwrap())
            .collect();
        history.gram(parts).unwrap()
    }

    /// The ring's Gram matrix, kept in products of groups and updated only where rows were
    /// written, is the Gram matrix of its rows at every re-estimation, before and after it
    /// wraps and whether or not the interval divides the capacity; a ring restored from its
    /// rows computes the same values to the bit.
    #[test]
    fn the_rings_gram_matrix_follows_its_rows_and_survives_a_resume() {
        use crate::optim::bsfa::test_tensors::random;
        for (capacity, interval) in [(6, 2), (7, 3), (5, 5), (4, 9)] {
            let updates = random(23, 37, capacity as u64);
            let mut history = History::new(32);
            let mut products = 0;
            for step in 0..23 {
                if step > 0 && step % interval == 0 {
                    products += history
                        .gram_parts(&history.matrix().unwrap().unwrap())
                        .unwrap()
                        .len();
                    let gram = gram_of(&mut history);
                    let h = history.matrix().unwrap().unwrap();
                    let direct: Vec<f64> = h
                        .matmul(&h.t().unwrap())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let worst = gram
                        .iter()
                        .zip(&direct)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(worst < 1e-4, "capacity {capacity}, step {step}: {worst}");
                    // Restored from its checkpoint rows: the same Gram matrix, bit for bit.
                    let rows = history.full_rows().unwrap().unwrap();
                    let stored = Stored::Full(Tensor::cat(&rows, 0).unwrap());
                    let mut restored =
                        History::restore(stored, capacity, interval, step as u64).unwrap();
                    assert_eq!(
                        gram_of(&mut restored),
                        gram,
                        "capacity {capacity}, step {step}"
                    );
                }
                history
                    .record(&updates.get(step).unwrap(), capacity, interval)
                    .unwrap();
            }
            // Only the groups written since the last re-estimation were computed again.
            let groups = capacity.div_ceil(interval.min(capacity));
            let estimates = 22 / interval;
            assert!(
                products < groups * estimates || groups == 1,
                "{products} products"
            );
        }
    }

    /// Past its capacity the ring keeps the latest updates, gives them to a checkpoint
    /// oldest first, and restores from those rows to the same history.
    #[test]
    fn the_ring_keeps_the_latest_updates_and_round_trips() {
        let mut history = History::new(32);
        for i in 0..7 {
            history.record(&update(i), 4, 2).unwrap();
        }
        let rows = history.full_rows().unwrap().unwrap();
        assert_eq!(firsts(&rows), [3.0, 4.0, 5.0, 6.0]);
        let matrix = history.matrix().unwrap().unwrap();
        let mut held: Vec<f32> = matrix
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        held.sort_by(f32::total_cmp);
        assert_eq!(held, [3.0, 4.0, 5.0, 6.0]);

        // Restored rows lie in the slots they were written to.
        let slots = |h: &History| -> Vec<f32> {
            let m = h.matrix().unwrap().unwrap();
            m.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let stored = Stored::Full(Tensor::cat(&rows, 0).unwrap());
        let restored = History::restore(stored, 4, 2, 7).unwrap();
        assert_eq!(slots(&restored), slots(&history));
        let stored = Stored::Full(Tensor::cat(&rows, 0).unwrap());
        let mut restored = History::restore(stored, 4, 2, 7).unwrap();
        restored.record(&update(7), 4, 2).unwrap();
        let rows = restored.full_rows().unwrap().unwrap();
        assert_eq!(firsts(&rows), [4.0, 5.0, 6.0, 7.0]);

        // A partial history restores to a ring that fills before it drops anything.
        let partial = Stored::Full(Tensor::cat(&rows[..2], 0).unwrap());
        let mut restored = History::restore(partial, 4, 2, 2).unwrap();
        for i in 8..11 {
            restored.record(&update(i), 4, 2).unwrap();
        }
        assert_eq!(
            firsts(&restored.full_rows().unwrap().unwrap()),
            [5.0, 8.0, 9.0, 10.0]
        );
    }
}
