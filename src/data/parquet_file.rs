//! Opening parquet files and reading their byte-array (string or binary) columns one row
//! group at a time, so memory stays bounded by the largest row group: shared by the text
//! corpora ([`super::parquet_text`]) and the hub's image sets ([`super::images::parquet`]).

use anyhow::{bail, Context, Result};
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::fs::File;
use std::path::Path;

/// Opens `path` as a parquet file.
pub fn open(path: &Path) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    SerializedFileReader::new(file)
        .with_context(|| format!("'{}' is not a readable parquet file", path.display()))
}

/// The index of leaf column `name` (a dotted path such as `image.bytes`) in `reader`, the
/// file at `path`; the error lists the file's columns.
pub fn find_column(reader: &SerializedFileReader<File>, path: &Path, name: &str) -> Result<usize> {
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    names.iter().position(|n| n == name).with_context(|| {
        format!(
            "parquet file '{}' has no '{name}' column (its columns: {})",
            path.display(),
            names.join(", ")
        )
    })
}

/// Byte-array column `column` of row group `index` of `reader` (the file at `path`): the
/// present values in row order and every row's definition level (below the column's
/// maximum: a null). A column of another type is the error `not_bytes()`.
pub fn read_byte_column(
    reader: &SerializedFileReader<File>,
    path: &Path,
    index: usize,
    column: usize,
    not_bytes: impl FnOnce() -> String,
) -> Result<(Vec<ByteArray>, Vec<i16>)> {
    let context = || format!("cannot read row group {index} of '{}'", path.display());
    let group = reader.get_row_group(index).with_context(context)?;
    let rows = group.metadata().num_rows() as usize;
    let ColumnReader::ByteArrayColumnReader(mut column) =
        group.get_column_reader(column).with_context(context)?
    else {
        bail!("{}", not_bytes());
    };
    let mut values: Vec<ByteArray> = Vec::with_capacity(rows);
    let mut levels: Vec<i16> = Vec::with_capacity(rows);
    column
        .read_records(rows, Some(&mut levels), None, &mut values)
        .with_context(context)?;
    Ok((values, levels))
}
