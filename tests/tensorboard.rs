//! TensorBoard event files (`OUT/tb/`): read back by a reader written here from the record
//! format (length, masked CRC-32C, protobuf `Event`), and by TensorBoard's own
//! `EventAccumulator` (`BSFA_PYTHON` with the `tensorboard` package, installed by
//! `scripts/install_test_tools.sh`; skipped without it unless `BSFA_REQUIRE_TOOLS`). Every
//! number of every metrics line must be there once per step, also after a crash and resume.

mod common;

use bsfa_train::tensorboard::masked_crc;
use common::tools::tool;
use common::{ok, records, run_with, test_model};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `(tag, step) -> values` (a list, so that duplicates show).
type Scalars = BTreeMap<(String, u64), Vec<f32>>;

/// A run of the test model of `steps` steps into `out`, evaluated every 5 steps and
/// checkpointed every 10, with `extra` flags and the environment variables `envs`.
fn train(out: &Path, steps: usize, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let steps = steps.to_string();
    let flags = [
        "--eval-every",
        "5",
        "--checkpoint-every",
        "10",
        "--steps",
        &steps,
        "--out",
        out.to_str().unwrap(),
    ];
    run_with(&test_model(&[&flags[..], extra].concat()), envs)
}

/// The scalars of every metrics line, as f32 (TensorBoard's `simple_value`).
fn from_metrics(out: &Path) -> Scalars {
    let mut scalars = Scalars::new();
    for record in records(out) {
        let step = record["step"].as_u64().unwrap();
        for (tag, value) in record.as_object().unwrap() {
            if let (Some(v), false) = (value.as_f64(), tag == "step") {
                scalars
                    .entry((tag.clone(), step))
                    .or_default()
                    .push(v as f32);
            }
        }
    }
    scalars
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .contains("tfevents")
        })
        .collect()
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let (mut value, mut shift) = (0u64, 0);
    loop {
        let b = bytes[*at];
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return value;
        }
        shift += 7;
    }
}

/// Protobuf fields of `bytes` as `(field, wire type, payload)`; varints as 8 LE bytes.
fn fields(bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => varint(bytes, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                bytes[at - 8..at].to_vec()
            }
            2 => {
                let n = varint(bytes, &mut at) as usize;
                at += n;
                bytes[at - n..at].to_vec()
            }
            5 => {
                at += 4;
                bytes[at - 4..at].to_vec()
            }
            other => panic!("wire type {other}"),
        };
        out.push((field, wire, payload));
    }
    out
}

/// Reads an event file from the format's definition, checking every CRC; returns the
/// file version and the scalars.
fn read_events(path: &Path) -> (String, Scalars) {
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut version, mut scalars) = (0, String::new(), Scalars::new());
    while at < bytes.len() {
        let header = &bytes[at..at + 8];
        let n = u64::from_le_bytes(header.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc(header), "length CRC at {at}");
        let payload = &bytes[at + 12..at + 12 + n];
        let crc = u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc(payload), "payload CRC at {at}");
        at += 16 + n;
        let event = fields(payload);
        let step = event
            .iter()
            .find(|f| f.0 == 2)
            .map_or(0, |f| u64::from_le_bytes(f.2[..8].try_into().unwrap()));
        for (field, _, value) in &event {
            match field {
                3 => version = String::from_utf8(value.clone()).unwrap(),
                5 => {
                    for (_, _, scalar) in fields(value) {
                        let parts = fields(&scalar);
                        let tag = String::from_utf8(parts[0].2.clone()).unwrap();
                        let v = f32::from_le_bytes(parts[1].2[..4].try_into().unwrap());
                        scalars.entry((tag, step)).or_default().push(v);
                    }
                }
                _ => {}
            }
        }
    }
    (version, scalars)
}

/// TensorBoard's own reader over `OUT/tb`: every scalar tag's `(step, value)` list.
fn read_with_tensorboard(python: &Path, out: &Path) -> Scalars {
    let script = "import json, sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n\
        acc.Reload()\n\
        print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] \
        for t in acc.Tags()['scalars']}))\n";
    let output = ok(Command::new(python)
        .args(["-c", script])
        .arg(out.join("tb"))
        .output()
        .unwrap());
    let tags: BTreeMap<String, Vec<(u64, f32)>> = serde_json::from_slice(&output.stdout).unwrap();
    let mut scalars = Scalars::new();
    for (tag, points) in tags {
        for (step, value) in points {
            scalars.entry((tag.clone(), step)).or_default().push(value);
        }
    }
    scalars
}

#[test]
fn every_metric_is_an_event_once_also_after_a_crash_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Aborts after step 13: steps 11-13 were logged after the checkpoint of step 10.
    let crashed = train(
        &out,
        20,
        &[],
        &[
            ("BSFA_TRAIN_FAILPOINT", "rank-abort:13"),
            ("BSFA_TRAIN_TEST_HOOKS", "1"),
        ],
    );
    assert!(!crashed.status.success());
    ok(train(&out, 20, &["--resume", "auto"], &[]));
    let expected = from_metrics(&out);
    assert_eq!(expected[&("loss".to_string(), 12)].len(), 1);
    assert!(expected.contains_key(&("val_loss".to_string(), 20)));
    let files = event_files(&out);
    assert_eq!(files.len(), 1, "{files:?}");
    let (version, ours) = read_events(&files[0]);
    assert_eq!(version, "brain.Event:2");
    assert_eq!(ours, expected, "the events differ from metrics.jsonl");
    if let Some(python) = tool("BSFA_PYTHON", &[]) {
        assert_eq!(read_with_tensorboard(&python, &out), expected);
    }
    // A torn last record (a crash mid-write) leaves the rest readable.
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() - 7]).unwrap();
    if let Some(python) = tool("BSFA_PYTHON", &[]) {
        let read = read_with_tensorboard(&python, &out);
        assert!(read.len() < expected.len() && read.len() + 8 > expected.len());
    }

    // Switched off, no event files are written.
    let off = dir.path().join("off");
    let output = train(&off, 2, &["--set", "train.tensorboard=false"], &[]);
    assert!(output.status.success());
    assert!(!off.join("tb").exists());
}
