//! The row-group cache of a parquet image set: recently read groups of undecoded image
//! files, bounded in bytes.

use anyhow::{bail, Result};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

/// A row group's image files, `None` for a null.
pub(super) type Rows = Arc<Vec<Option<Vec<u8>>>>;
/// A group once read (or its read error), shared by every thread that asks for it.
type Slot = Arc<OnceLock<std::result::Result<Rows, String>>>;

/// Recently read row groups, least recently used first, bounded in bytes (at least one
/// group stays). A group being read by one thread is waited for, not read twice.
pub(super) struct RowGroupCache {
    budget: usize,
    entries: Mutex<VecDeque<(usize, Slot)>>,
}

impl RowGroupCache {
    /// An empty cache holding up to `budget` bytes.
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// Row group `key`, read with `read` unless cached.
    pub(super) fn get(
        &self,
        key: usize,
        read: impl FnOnce() -> Result<Vec<Option<Vec<u8>>>>,
    ) -> Result<Rows> {
        let slot = {
            let mut entries = self.entries.lock().expect("cache lock");
            let slot = match entries.iter().position(|(k, _)| *k == key) {
                Some(i) => entries.remove(i).expect("index in range").1,
                None => Arc::new(OnceLock::new()),
            };
            entries.push_back((key, slot.clone()));
            let size = |s: &Slot| match s.get() {
                Some(Ok(rows)) => rows.iter().flatten().map(Vec::len).sum(),
                _ => 0,
            };
            let mut total: usize = entries.iter().map(|(_, s)| size(s)).sum();
            while total > self.budget && entries.len() > 1 {
                let (_, old) = entries.pop_front().expect("non-empty");
                total -= size(&old);
            }
            slot
        };
        match slot.get_or_init(|| read().map(Arc::new).map_err(|e| format!("{e:#}"))) {
            Ok(rows) => Ok(rows.clone()),
            Err(e) => bail!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_recent_groups_within_its_budget() {
        let cache = RowGroupCache::new(25);
        let reads = std::cell::Cell::new(0);
        let group = |n: usize| {
            reads.set(reads.get() + 1);
            Ok(vec![Some(vec![0u8; n])])
        };
        cache.get(0, || group(10)).unwrap();
        cache.get(1, || group(10)).unwrap();
        cache.get(0, || group(10)).unwrap();
        assert_eq!(reads.get(), 2);
        // A third group overflows the budget: the least recently used (1) goes at the next
        // access (sizes are known once read).
        cache.get(2, || group(10)).unwrap();
        cache.get(3, || group(1)).unwrap();
        cache.get(0, || group(10)).unwrap();
        assert_eq!(reads.get(), 4);
        cache.get(1, || group(10)).unwrap();
        assert_eq!(reads.get(), 5);
    }
}
