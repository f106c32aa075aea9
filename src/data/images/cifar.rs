//! CIFAR-10 in its binary form (`cifar-10-batches-bin`): `data_batch_1.bin` ..
//! `data_batch_5.bin` (train) and `test_batch.bin` (val), each a run of 3073-byte records:
//! the label byte, then the 32x32 red plane, green plane and blue plane, rows top to bottom.
//!
//! The whole split is read into memory at open (150 MB for train): the files are small,
//! and random access is then free.

use super::{ImageSource, Rgb8, Split};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Bytes per record: a label and a 32x32x3 image.
pub const RECORD: usize = 1 + 3 * 1024;

/// CIFAR-10 class names in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// One split of CIFAR-10, in memory.
pub struct Cifar10 {
    records: Vec<u8>,
}

/// The files of a split.
pub fn split_files(split: Split) -> Vec<String> {
    match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Val => vec!["test_batch.bin".to_string()],
    }
}

impl Cifar10 {
    /// Reads the split's files from `dir` or from `dir/cifar-10-batches-bin` (the folder the
    /// official archive unpacks to). Every file must exist, hold whole records, and labels
    /// must be below 10.
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        let nested = dir.join("cifar-10-batches-bin");
        let dir: PathBuf = if dir.join(&split_files(split)[0]).is_file() || !nested.is_dir() {
            dir.to_path_buf()
        } else {
            nested
        };
        let mut records = Vec::new();
        for name in split_files(split) {
            let path = dir.join(&name);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "cannot read CIFAR-10 file '{}' (the {} split needs {})",
                    path.display(),
                    split.name(),
                    split_files(split).join(", ")
                )
            })?;
            if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
                bail!(
                    "'{}' is {} bytes, not a whole number of {RECORD}-byte CIFAR-10 records",
                    path.display(),
                    bytes.len()
                );
            }
            if let Some(i) = bytes.chunks(RECORD).position(|r| r[0] >= 10) {
                bail!(
                    "record {i} of '{}' has label {}; CIFAR-10 labels are 0-9",
                    path.display(),
                    bytes[i * RECORD]
                );
            }
            records.extend_from_slice(&bytes);
        }
        Ok(Self { records })
    }
}

impl ImageSource for Cifar10 {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(CLASS_NAMES.iter().map(|s| s.to_string()).collect())
    }

    fn load(&self, index: usize) -> Result<(Rgb8, u32)> {
        let Some(record) = self.records.get(index * RECORD..(index + 1) * RECORD) else {
            bail!("CIFAR-10 image {index} is past the end ({})", self.len());
        };
        let (r, rest) = record[1..].split_at(1024);
        let (g, b) = rest.split_at(1024);
        let pixels = (0..1024).flat_map(|i| [r[i], g[i], b[i]]).collect();
        Ok((Rgb8::new(32, 32, pixels)?, record[0] as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose pixel `(x, y)` is `(label, x, y)`, which decodes to a known image.
    fn record(label: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(label, 1024));
        r.extend((0..1024).map(|i| (i % 32) as u8));
        r.extend((0..1024).map(|i| (i / 32) as u8));
        r
    }

    #[test]
    fn reads_records_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&nested).unwrap();
        for i in 1..=5u8 {
            let bytes: Vec<u8> = [record(i), record(i + 1)].concat();
            std::fs::write(nested.join(format!("data_batch_{i}.bin")), bytes).unwrap();
        }
        std::fs::write(nested.join("test_batch.bin"), record(9)).unwrap();
        let spec = format!("cifar10:{}", dir.path().display())
            .parse::<crate::data::DataSpec>()
            .unwrap();
        let (train, val) = super::super::open_pair(&spec).unwrap();
        assert_eq!((train.len(), val.len(), train.num_classes()), (10, 1, 10));
        let (img, label) = train.load(3).unwrap();
        assert_eq!(label, 3);
        assert_eq!(img.pixel(5, 7), [3, 5, 7]);
        assert_eq!(val.load(0).unwrap().1, 9);
        assert!(train.load(10).is_err());

        // A truncated file, a bad label, a missing file.
        std::fs::write(nested.join("test_batch.bin"), &record(1)[..100]).unwrap();
        let err = Cifar10::open(&nested, Split::Val)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("test_batch.bin' is 100 bytes"), "{err}");
        std::fs::write(nested.join("test_batch.bin"), record(10)).unwrap();
        let err = Cifar10::open(&nested, Split::Val)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has label 10"), "{err}");
        std::fs::remove_file(nested.join("data_batch_4.bin")).unwrap();
        let err = Cifar10::open(dir.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("data_batch_4.bin"), "{err}");
    }
}
