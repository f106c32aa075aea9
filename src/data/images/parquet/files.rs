//! Finding a split's parquet files and reading what is known at open: where each file's
//! columns are, its row groups, its labels and the class names in its metadata.

use crate::data::images::Split;
use crate::data::parquet_file;
use anyhow::{bail, Context, Result};
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One parquet file and where its columns are.
pub(super) struct ImageFile {
    pub(super) path: PathBuf,
    /// Serialised: the reader seeks a shared file handle.
    pub(super) reader: Mutex<SerializedFileReader<File>>,
    pub(super) bytes_column: usize,
    /// Definition level of a present `image.bytes` value (below it: a null).
    pub(super) bytes_def: i16,
}

/// A row group's place in the set.
pub(super) struct Group {
    /// Index of its file in the set.
    pub(super) file: usize,
    /// Index of the group in its file.
    pub(super) group: usize,
    /// The set's index of its first row.
    pub(super) start: usize,
    pub(super) rows: usize,
}

/// Folder and file-name stems that mark a split's files.
fn split_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Val => &["validation", "val"],
    }
}

/// Whether `path` is a file of `split`, by its name or its folder's.
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

/// Opens one file, appending its row groups and labels; returns it with its class names.
pub(super) fn open_file(
    path: &Path,
    groups: &mut Vec<Group>,
    labels: &mut Vec<u32>,
    index: usize,
) -> Result<(ImageFile, Option<Vec<String>>)> {
    let reader = parquet_file::open(path)?;
    let bytes_column = parquet_file::find_column(&reader, path, "image.bytes")?;
    let label_column = parquet_file::find_column(&reader, path, "label")?;
    let schema = reader.metadata().file_metadata().schema_descr();
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
