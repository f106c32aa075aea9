//! Image classification sets as the Hugging Face hub stores them in parquet (e.g.
//! `imagenet-1k`): an `image` struct column whose `bytes` field holds the encoded file, and
//! an integer `label` column.
//!
//! Files are found under the given folder (searched recursively, hidden folders skipped) by
//! split: `train-*.parquet` / `train_*` or any `.parquet` inside a `train/` folder for
//! train; `validation-*`, `val-*` (or a `validation/` / `val/` folder) for val. Labels are
//! read at open (the label column alone); image bytes are read a row group at a time, on
//! demand, and the most recent row groups stay cached, so the pipeline's shuffle (which stays
//! within a window of row groups, see [`ImageSource::locality`]) reads each group once.
//! The number of classes comes from the `ClassLabel` names the `datasets` library stores in
//! the file metadata, or else from the largest label.
//!
//! Layout: `files` finds a split's files and reads what is known at open (columns, row
//! groups, labels, class names), `cache` keeps recent row groups, `write` writes the hub's
//! layout (for tests and small local sets); reading a row group is shared with the text
//! corpora in [`crate::data::parquet_file`].

mod cache;
mod files;
mod write;

pub use files::split_files;
pub use write::write_hub_file;

use super::{ImageSource, Rgb8, Split};
use crate::data::parquet_file;
use anyhow::{bail, Context, Result};
use cache::RowGroupCache;
use files::{open_file, Group, ImageFile};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bytes of row groups kept in memory by default (undecoded image files).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// One split of a parquet image set.
pub struct ParquetImages {
    files: Vec<ImageFile>,
    groups: Vec<Group>,
    labels: Vec<u32>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    cache: RowGroupCache,
}

impl ParquetImages {
    /// Opens the split's files under `dir`, reading their labels, with the default cache.
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        Self::open_files(&split_files(dir, split)?, DEFAULT_CACHE_BYTES)
    }

    /// Opens the given files (in that order), caching up to `cache_bytes` of row groups.
    pub fn open_files(paths: &[PathBuf], cache_bytes: usize) -> Result<Self> {
        let mut files = Vec::new();
        let mut groups = Vec::new();
        let mut labels = Vec::new();
        let mut class_names = None;
        for path in paths {
            let (file, names) = open_file(path, &mut groups, &mut labels, files.len())?;
            if class_names.is_none() {
                class_names = names;
            }
            files.push(file);
        }
        let largest = labels.iter().copied().max().map_or(0, |l| l as usize + 1);
        let num_classes = match &class_names {
            Some(names) if names.len() < largest => bail!(
                "'{}' names {} classes in its metadata but has label {}",
                paths[0].display(),
                names.len(),
                largest - 1
            ),
            Some(names) => names.len(),
            None => largest,
        };
        Ok(Self {
            files,
            groups,
            labels,
            num_classes,
            class_names,
            cache: RowGroupCache::new(cache_bytes),
        })
    }

    /// Reads the image bytes of row group `g` (None for a null).
    fn read_group(&self, g: usize) -> Result<Vec<Option<Vec<u8>>>> {
        let group = &self.groups[g];
        let file = &self.files[group.file];
        let (values, levels) = {
            let reader = file.reader.lock().expect("parquet reader lock");
            let not_binary = || {
                format!(
                    "'{}': image.bytes is not a binary column",
                    file.path.display()
                )
            };
            parquet_file::read_byte_column(
                &reader,
                &file.path,
                group.group,
                file.bytes_column,
                not_binary,
            )?
        };
        let mut values = values.into_iter();
        Ok(levels
            .iter()
            .map(|&l| (l == file.bytes_def).then(|| values.next().map(|v| v.data().to_vec()))?)
            .collect())
    }
}

impl ImageSource for ParquetImages {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn class_names(&self) -> Option<Vec<String>> {
        self.class_names.clone()
    }

    fn load(&self, index: usize) -> Result<(Rgb8, u32)> {
        if index >= self.len() {
            bail!("image {index} is past the end ({})", self.len());
        }
        let g = self.groups.partition_point(|g| g.start + g.rows <= index);
        let group = &self.groups[g];
        let rows = self.cache.get(g, || self.read_group(g))?;
        let row = index - group.start;
        let name = || {
            format!(
                "row {row} of row group {} of '{}'",
                group.group,
                self.files[group.file].path.display()
            )
        };
        let Some(bytes) = &rows[row] else {
            bail!("{} has no image bytes", name());
        };
        let image = Rgb8::decode(bytes).with_context(name)?;
        Ok((image, self.labels[index]))
    }

    fn locality(&self) -> Vec<Range<usize>> {
        self.groups
            .iter()
            .map(|g| g.start..g.start + g.rows)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::synthetic::SyntheticImages;
    use super::super::tests::encode;
    use super::*;

    fn rows(n: usize, classes: i64) -> Vec<(Option<Vec<u8>>, i64)> {
        let source = SyntheticImages::new(Split::Train, n, 16, 2);
        (0..n)
            .map(|i| {
                let img = source.load(i).unwrap().0;
                (
                    Some(encode(&img, image::ImageFormat::Png)),
                    i as i64 % classes,
                )
            })
            .collect()
    }

    #[test]
    fn reads_hub_files_by_split_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let train = rows(25, 4);
        let names = ["a", "b", "c", "d"];
        write_hub_file(
            &data.join("train-00000-of-00002.parquet"),
            &train[..15],
            4,
            Some(&names),
        )
        .unwrap();
        write_hub_file(
            &data.join("train-00001-of-00002.parquet"),
            &train[15..],
            4,
            Some(&names),
        )
        .unwrap();
        write_hub_file(
            &data.join("validation-00000-of-00001.parquet"),
            &rows(6, 4),
            10,
            Some(&names),
        )
        .unwrap();
        write_hub_file(
            &data.join("test-00000-of-00001.parquet"),
            &[(None, -1)],
            10,
            None,
        )
        .unwrap();
        let spec = format!("parquet:{}", dir.path().display())
            .parse::<crate::data::DataSpec>()
            .unwrap();
        let (t, v) = super::super::open_pair(&spec).unwrap();
        assert_eq!((t.len(), v.len(), t.num_classes()), (25, 6, 4));
        assert_eq!(t.class_names().unwrap(), names);
        // Row groups of 4: 4+4+4+3 rows in the first file, 4+4+2 in the second.
        let ranges = t.locality();
        assert_eq!(ranges.len(), 7);
        assert_eq!(ranges[3], 12..15);
        assert_eq!(ranges[4], 15..19);
        let source = SyntheticImages::new(Split::Train, 25, 16, 2);
        for i in [0, 14, 15, 24, 3] {
            let (img, label) = t.load(i).unwrap();
            assert_eq!(img, source.load(i).unwrap().0);
            assert_eq!(label, i as u32 % 4);
        }
        assert!(t.load(25).is_err());
    }

    #[test]
    fn corrupt_rows_unlabelled_splits_and_missing_columns_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut train = rows(6, 3);
        train[2].0 = Some(b"garbage".to_vec());
        train[4].0 = None;
        let path = dir.path().join("train-0.parquet");
        write_hub_file(&path, &train, 3, None).unwrap();
        let t = ParquetImages::open(dir.path(), Split::Train).unwrap();
        // No metadata: classes from the largest label.
        assert_eq!((t.num_classes(), t.class_names()), (3, None));
        let err = format!("{:#}", t.load(2).unwrap_err());
        assert!(
            err.contains("row 2 of row group 0") && err.contains("cannot decode"),
            "{err}"
        );
        let err = format!("{:#}", t.load(4).unwrap_err());
        assert!(
            err.contains("row 1 of row group 1") && err.contains("no image bytes"),
            "{err}"
        );
        assert!(t.load(5).is_ok());

        let val = dir.path().join("val");
        std::fs::create_dir(&val).unwrap();
        write_hub_file(
            &val.join("part-0.parquet"),
            &[(None, 1), (None, -1)],
            3,
            None,
        )
        .unwrap();
        let err = ParquetImages::open(dir.path(), Split::Val)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has label -1"), "{err}");

        let text = dir.path().join("validation-0.parquet");
        crate::data::parquet_text::write_string_column(&text, "text", &["x"], 1).unwrap();
        let err = ParquetImages::open_files(&[text], 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no 'image.bytes' column"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = ParquetImages::open(empty.path(), Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no train parquet files"), "{err}");
    }
}
