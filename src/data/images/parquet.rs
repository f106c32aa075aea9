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

use super::{ImageSource, Rgb8, Split};
use anyhow::{bail, Context, Result};
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes of row groups kept in memory by default (undecoded image files).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// One parquet file and where its columns are.
struct ImageFile {
    path: PathBuf,
    /// Serialised: the reader seeks a shared file handle.
    reader: Mutex<SerializedFileReader<File>>,
    bytes_column: usize,
    /// Definition level of a present `image.bytes` value (below it: a null).
    bytes_def: i16,
}

/// A row group's place in the set.
struct Group {
    file: usize,
    group: usize,
    start: usize,
    rows: usize,
}

type Rows = Arc<Vec<Option<Vec<u8>>>>;
type Slot = Arc<OnceLock<std::result::Result<Rows, String>>>;

/// Recently read row groups, least recently used first, bounded in bytes (at least one
/// group stays). A group being read by one thread is waited for, not read twice.
struct RowGroupCache {
    budget: usize,
    entries: Mutex<VecDeque<(usize, Slot)>>,
}

impl RowGroupCache {
    fn get(&self, key: usize, read: impl FnOnce() -> Result<Vec<Option<Vec<u8>>>>) -> Result<Rows> {
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

/// One split of a parquet image set.
pub struct ParquetImages {
    files: Vec<ImageFile>,
    groups: Vec<Group>,
    labels: Vec<u32>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    cache: RowGroupCache,
}

/// Folder and file-name stems that mark a split's files.
fn split_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Val => &["validation", "val"],
    }
}

fn belongs_to(path: &Path, split: Split) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    split_names(split).iter().any(|s| {
        parent == *s
            || name
                .strip_prefix(s)
                .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'))
    })
}

/// The split's parquet files under `dir`, sorted by path.
pub fn split_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, split: Split, out: &mut Vec<PathBuf>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot list '{}'", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                walk(&path, split, out)?;
            } else if path.extension().is_some_and(|e| e == "parquet") && belongs_to(&path, split) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, split, &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!(
            "no {} parquet files under '{}' (looked for {} files, or .parquet files in a folder \
             of that name)",
            split.name(),
            dir.display(),
            split_names(split)
                .iter()
                .map(|s| format!("'{s}-*.parquet'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(files)
}

/// The `ClassLabel` names of the `label` column in the `datasets` metadata, if any.
fn hub_class_names(reader: &SerializedFileReader<File>) -> Option<Vec<String>> {
    let metadata = reader.metadata().file_metadata().key_value_metadata()?;
    let json = metadata
        .iter()
        .find(|kv| kv.key == "huggingface")?
        .value
        .as_ref()?;
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let names = value["info"]["features"]["label"]["names"].as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
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
            cache: RowGroupCache {
                budget: cache_bytes,
                entries: Mutex::new(VecDeque::new()),
            },
        })
    }

    /// Reads the image bytes of row group `g` (None for a null).
    fn read_group(&self, g: usize) -> Result<Vec<Option<Vec<u8>>>> {
        let group = &self.groups[g];
        let file = &self.files[group.file];
        let context = || {
            format!(
                "cannot read row group {} of '{}'",
                group.group,
                file.path.display()
            )
        };
        let mut values: Vec<ByteArray> = Vec::with_capacity(group.rows);
        let mut levels: Vec<i16> = Vec::with_capacity(group.rows);
        {
            let reader = file.reader.lock().expect("parquet reader lock");
            let row_group = reader.get_row_group(group.group).with_context(context)?;
            let ColumnReader::ByteArrayColumnReader(mut column) = row_group
                .get_column_reader(file.bytes_column)
                .with_context(context)?
            else {
                bail!(
                    "'{}': image.bytes is not a binary column",
                    file.path.display()
                );
            };
            column
                .read_records(group.rows, Some(&mut levels), None, &mut values)
                .with_context(context)?;
        }
        let mut values = values.into_iter();
        Ok(levels
            .iter()
            .map(|&l| (l == file.bytes_def).then(|| values.next().map(|v| v.data().to_vec()))?)
            .collect())
    }
}

/// Opens one file, appending its row groups and labels; returns it with its class names.
fn open_file(
    path: &Path,
    groups: &mut Vec<Group>,
    labels: &mut Vec<u32>,
    index: usize,
) -> Result<(ImageFile, Option<Vec<String>>)> {
    let file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("'{}' is not a readable parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    let find = |name: &str| {
        names.iter().position(|n| n == name).with_context(|| {
            format!(
                "parquet file '{}' has no '{name}' column (its columns: {})",
                path.display(),
                names.join(", ")
            )
        })
    };
    let bytes_column = find("image.bytes")?;
    let label_column = find("label")?;
    let bytes_def = schema.column(bytes_column).max_def_level();
    let label_def = schema.column(label_column).max_def_level();
    let meta = reader.metadata();
    for g in 0..meta.num_row_groups() {
        let rows = meta.row_group(g).num_rows() as usize;
        let context = || format!("cannot read the labels of '{}'", path.display());
        let row_group = reader.get_row_group(g).with_context(context)?;
        let mut levels: Vec<i16> = Vec::with_capacity(rows);
        let values: Vec<i64> = match row_group
            .get_column_reader(label_column)
            .with_context(context)?
        {
            ColumnReader::Int64ColumnReader(mut c) => {
                let mut v = Vec::with_capacity(rows);
                c.read_records(rows, Some(&mut levels), None, &mut v)
                    .with_context(context)?;
                v
            }
            ColumnReader::Int32ColumnReader(mut c) => {
                let mut v = Vec::with_capacity(rows);
                c.read_records(rows, Some(&mut levels), None, &mut v)
                    .with_context(context)?;
                v.into_iter().map(i64::from).collect()
            }
            _ => bail!(
                "the 'label' column of '{}' is not an integer column",
                path.display()
            ),
        };
        if values.len() != rows || levels.iter().any(|&l| l != label_def) && label_def > 0 {
            bail!("'{}' has rows without a label", path.display());
        }
        for (row, &label) in values.iter().enumerate() {
            let Ok(label) = u32::try_from(label) else {
                bail!(
                    "row {row} of row group {g} of '{}' has label {label}; an unlabelled split \
                     (such as imagenet-1k's test) cannot be trained or evaluated on",
                    path.display()
                );
            };
            labels.push(label);
        }
        let start = groups.last().map_or(0, |l: &Group| l.start + l.rows);
        groups.push(Group {
            file: index,
            group: g,
            start,
            rows,
        });
    }
    let names = hub_class_names(&reader);
    let file = ImageFile {
        path: path.to_path_buf(),
        reader: Mutex::new(reader),
        bytes_column,
        bytes_def,
    };
    Ok((file, names))
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

/// Writes a parquet file in the hub's layout (`image` struct with `bytes` and `path`,
/// int64 `label`), `rows_per_group` rows per row group; `None` images are nulls. With
/// `class_names`, the `datasets` metadata naming the classes is stored too. For tests and
/// for building small local sets.
pub fn write_hub_file(
    path: &Path,
    rows: &[(Option<Vec<u8>>, i64)],
    rows_per_group: usize,
    class_names: Option<&[&str]>,
) -> Result<()> {
    use parquet::data_type::{ByteArrayType, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = Arc::new(parse_message_type(
        "message schema { OPTIONAL group image { OPTIONAL BYTE_ARRAY bytes; \
         OPTIONAL BYTE_ARRAY path (UTF8); } OPTIONAL INT64 label; }",
    )?);
    let metadata = class_names.map(|names| {
        let json = serde_json::json!({"info": {"features": {
            "image": {"_type": "Image"},
            "label": {"names": names, "_type": "ClassLabel"},
        }}});
        vec![KeyValue::new("huggingface".to_string(), json.to_string())]
    });
    let props = WriterProperties::builder()
        .set_key_value_metadata(metadata)
        .build();
    let file = File::create(path).with_context(|| format!("cannot create '{}'", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(props))?;
    for chunk in rows.chunks(rows_per_group.max(1)) {
        let mut group = writer.next_row_group()?;
        let mut column_index = 0;
        while let Some(mut column) = group.next_column()? {
            match column_index {
                0 => {
                    let values: Vec<ByteArray> = chunk
                        .iter()
                        .filter_map(|(b, _)| b.clone().map(ByteArray::from))
                        .collect();
                    let levels: Vec<i16> = chunk
                        .iter()
                        .map(|(b, _)| if b.is_some() { 2 } else { 1 })
                        .collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, Some(&levels), None)?;
                }
                1 => {
                    let values: Vec<ByteArray> = (0..chunk.len())
                        .map(|i| ByteArray::from(format!("{i}.JPEG").as_str()))
                        .collect();
                    column.typed::<ByteArrayType>().write_batch(
                        &values,
                        Some(&vec![2; chunk.len()]),
                        None,
                    )?;
                }
                _ => {
                    let values: Vec<i64> = chunk.iter().map(|(_, l)| *l).collect();
                    column.typed::<Int64Type>().write_batch(
                        &values,
                        Some(&vec![1; chunk.len()]),
                        None,
                    )?;
                }
            }
            column.close()?;
            column_index += 1;
        }
        group.close()?;
    }
    writer.close()?;
    Ok(())
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

    #[test]
    fn the_cache_keeps_recent_groups_within_its_budget() {
        let cache = RowGroupCache {
            budget: 25,
            entries: Mutex::new(VecDeque::new()),
        };
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
