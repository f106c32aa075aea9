//! TensorBoard event files: every number of every metrics line as a scalar, in the format
//! TensorBoard (and W&B's `sync_tensorboard`) reads, in `OUT/tb/`.
//!
//! A file is a sequence of records, each flushed as it is written, so a crash loses at most
//! the last record (readers stop at a torn one):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | `n`, the payload's length, little-endian |
//! | 4 | masked CRC-32C of those 8 bytes |
//! | n | the payload: a protobuf `tensorflow.Event` |
//! | 4 | masked CRC-32C of the payload |
//!
//! The masked CRC is `((c >> 15) | (c << 17)) + 0xa282ead8` (a rotation, then a wrapping add). The first event
//! carries `file_version = "brain.Event:2"`; each later one a `Summary` with one
//! `simple_value` per number of the metrics line. The protobuf fields used:
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3;
//! Summary summary = 5; }`, `Summary { repeated Value value = 1; }`,
//! `Value { string tag = 1; float simple_value = 2; }`.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Writes one run's event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Starts a new event file in `dir` (created if missing), replacing the event files
    /// already there, and writes `records` into it: a resumed run passes the metrics lines
    /// it kept, so that no step appears twice.
    pub fn create<'a>(dir: &Path, records: impl IntoIterator<Item = &'a Value>) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create '{}'", dir.display()))?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if is_event_file(&path) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot replace '{}'", path.display()))?;
            }
        }
        let host = hostname();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now() as u64));
        let file =
            File::create(&path).with_context(|| format!("cannot create '{}'", path.display()))?;
        let mut writer = Self { file, path };
        let mut first = Vec::new();
        put_f64(&mut first, 1, now());
        put_bytes(&mut first, 3, b"brain.Event:2");
        writer.record(&first)?;
        for record in records {
            writer.write(record)?;
        }
        Ok(writer)
    }

    /// Writes the numbers of one metrics line (all but `step`) as scalars at its step;
    /// lines without a step or without numbers are skipped.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        let Some(step) = record.get("step").and_then(Value::as_u64) else {
            return Ok(());
        };
        let mut summary = Vec::new();
        for (tag, value) in record.as_object().into_iter().flatten() {
            let Some(number) = value.as_f64().filter(|_| tag != "step") else {
                continue;
            };
            let mut scalar = Vec::new();
            put_bytes(&mut scalar, 1, tag.as_bytes());
            put_f32(&mut scalar, 2, number as f32);
            put_bytes(&mut summary, 1, &scalar);
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut event = Vec::new();
        put_f64(&mut event, 1, now());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Frames and appends one payload, then flushes.
    fn record(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(payload.len() + 16);
        framed.extend(len);
        framed.extend(masked_crc(&len).to_le_bytes());
        framed.extend(payload);
        framed.extend(masked_crc(payload).to_le_bytes());
        self.file
            .write_all(&framed)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write '{}'", self.path.display()))
    }
}

/// Whether `path` is an event file TensorBoard reads (its name holds `tfevents`).
fn is_event_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("tfevents"))
}

/// TFRecord's masked CRC-32C.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CRC32C.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, for the file name (TensorBoard's convention); `localhost` if unknown.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().replace(['/', ' '], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A protobuf field key: field number and wire type.
fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(out, (field << 3) | wire_type);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_key(out, field, 0);
    put_varint(out, value);
}

fn put_f64(out: &mut Vec<u8>, field: u64, value: f64) {
    put_key(out, field, 1);
    out.extend(value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend(bytes);
}

fn put_f32(out: &mut Vec<u8>, field: u64, value: f32) {
    put_key(out, field, 5);
    out.extend(value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xE3069283 (the CRC catalogue's check value); the mask is
        // checked end to end by TensorBoard's own reader (tests/tensorboard.rs).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varints_and_fields_follow_the_protobuf_encoding() {
        // The protobuf documentation's examples: 150 is 96 01; field 1 = 150 is 08 96 01.
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
        let mut out = Vec::new();
        put_bytes(&mut out, 2, b"testing");
        assert_eq!(out, [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']);
        let mut out = Vec::new();
        put_f32(&mut out, 2, 1.0);
        assert_eq!(out, [0x15, 0x00, 0x00, 0x80, 0x3f]);
    }
}
