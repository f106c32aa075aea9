//! The `text` column of parquet files, one row group at a time, so memory stays bounded by
//! the largest row group whatever the file's size.

use super::parquet_file;
use anyhow::{bail, Context, Result};
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::fs::File;
use std::path::{Path, PathBuf};

/// A parquet file whose `text` column has been located.
pub struct TextColumn {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    column: usize,
}

impl TextColumn {
    /// Opens `path` and finds its `text` column (a string column: BYTE_ARRAY).
    pub fn open(path: &Path) -> Result<Self> {
        let reader = parquet_file::open(path)?;
        let column = parquet_file::find_column(&reader, path, "text")?;
        let schema = reader.metadata().file_metadata().schema_descr();
        if schema.column(column).physical_type() != parquet::basic::Type::BYTE_ARRAY {
            bail!(
                "the 'text' column of '{}' is not a string column",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            column,
        })
    }

    /// Row groups in the file.
    pub fn row_groups(&self) -> usize {
        self.reader.metadata().num_row_groups()
    }

    /// The non-null texts of row group `index`, in row order.
    pub fn read_row_group(&self, index: usize) -> Result<Vec<String>> {
        let not_string = || {
            format!(
                "the 'text' column of '{}' is not a string column",
                self.path.display()
            )
        };
        let (values, _) = parquet_file::read_byte_column(
            &self.reader,
            &self.path,
            index,
            self.column,
            not_string,
        )?;
        values
            .into_iter()
            .map(|v| {
                String::from_utf8(v.data().to_vec()).with_context(|| {
                    format!("'{}' holds text that is not UTF-8", self.path.display())
                })
            })
            .collect()
    }
}

/// Writes a parquet file with one optional string column named `column` holding `texts`, in
/// row groups of `rows_per_group` (for tests and for building small local datasets).
pub fn write_string_column(
    path: &Path,
    column: &str,
    texts: &[&str],
    rows_per_group: usize,
) -> Result<()> {
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let schema = Arc::new(parse_message_type(&format!(
        "message schema {{ OPTIONAL BYTE_ARRAY {column} (UTF8); }}"
    ))?);
    let file = File::create(path).with_context(|| format!("cannot create '{}'", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema, Default::default())?;
    for chunk in texts.chunks(rows_per_group.max(1)) {
        let mut group = writer.next_row_group()?;
        while let Some(mut column) = group.next_column()? {
            let values: Vec<ByteArray> = chunk.iter().map(|t| ByteArray::from(*t)).collect();
            let levels = vec![1i16; chunk.len()];
            column
                .typed::<parquet::data_type::ByteArrayType>()
                .write_batch(&values, Some(&levels), None)?;
            column.close()?;
        }
        group.close()?;
    }
    writer.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_every_row_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-00000-of-00001.parquet");
        let rows: Vec<String> = (0..25).map(|i| format!("row {i} é")).collect();
        let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
        write_string_column(&path, "text", &refs, 10).unwrap();
        let file = TextColumn::open(&path).unwrap();
        assert_eq!(file.row_groups(), 3);
        let read: Vec<String> = (0..3)
            .flat_map(|g| file.read_row_group(g).unwrap())
            .collect();
        assert_eq!(read, rows);

        write_string_column(&path, "content", &refs, 10).unwrap();
        let err = TextColumn::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("no 'text' column (its columns: content)"),
            "{err}"
        );
    }
}
