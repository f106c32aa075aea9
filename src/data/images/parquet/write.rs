//! Writing parquet files in the hub's image layout, for tests and small local sets.

use anyhow::{Context, Result};
use parquet::data_type::ByteArray;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

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
