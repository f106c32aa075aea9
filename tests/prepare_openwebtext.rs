//! `prepare --data openwebtext`: the whole corpus from the owner's main-branch parquet files
//! on a local stand-in hub (issue #27): the complete `-of-N` set in order with its counts,
//! incomplete sets, partial conversions and failed downloads refused, and a killed prepare
//! resumed to the same bytes without downloading again.

mod common;

use bsfa_train::data::parquet_text::write_string_column;
use common::data::{encode, hub_free, run_hub_free, split_ids, word_tokenizer};
use common::hub::{self, hub_with, Hub, Revision};
use common::{fails, ok, ok_summary, stderr, summary};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The repository id of OpenWebText on the stand-in hub.
const OWT: &str = "datasets/Skylion007/openwebtext";

/// A small OpenWebText in the main branch's layout: `count` files
/// `data/train-0000i-of-0000N.parquet` of 20 documents (rows) each, in row groups of 7,
/// each document 5 to 60 words of the word tokenizer; `salt` varies the words. Returns the
/// repository files and the documents in the order `prepare` reads them (file index, then
/// row).
fn small_openwebtext(
    dir: &Path,
    count: usize,
    salt: usize,
) -> (HashMap<String, Vec<u8>>, Vec<String>) {
    let mut files = HashMap::new();
    let mut docs = Vec::new();
    for f in 0..count {
        let rows: Vec<String> = (0..20)
            .map(|r| {
                let d = salt + 20 * f + r;
                let words = 5 + (d * 7) % 56;
                let text: Vec<String> = (0..words)
                    .map(|k| format!("w{}", (d * 31 + k * 17) % 299))
                    .collect();
                text.join(" ")
            })
            .collect();
        let name = format!("data/train-{f:05}-of-{count:05}.parquet");
        let path = dir.join(format!("owt-{salt}-{f}.parquet"));
        let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
        write_string_column(&path, "text", &refs, 7).unwrap();
        files.insert(name, std::fs::read(&path).unwrap());
        docs.extend(rows);
    }
    (files, docs)
}

/// The token stream of `docs` by definition: `<|endoftext|>` (299) before every document.
fn stream(tok: &tokenizers::Tokenizer, docs: &[String]) -> Vec<u32> {
    docs.iter()
        .flat_map(|d| std::iter::once(299).chain(encode(tok, d)))
        .collect()
}

/// `prepare --data openwebtext --shard-tokens 150 --val-tokens 200` and `extra`.
fn prepare_owt(extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let args = [
        "prepare",
        "--data",
        "openwebtext",
        "--shard-tokens",
        "150",
        "--val-tokens",
        "200",
    ];
    run_hub_free(&[&args[..], extra].concat(), env)
}

/// A folder prepared before #27 (no record of the hub files read: OpenWebText's were the
/// partial conversion) is not taken as prepared: it is prepared again.
fn prepares_again_without_a_hub_record(shards: &Path, meta: &Value, env: &[(&str, &str)]) {
    let meta_path = shards.join("meta.json");
    let mut old_meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    old_meta.as_object_mut().unwrap().remove("hub");
    std::fs::write(&meta_path, old_meta.to_string()).unwrap();
    let output = prepare_owt(&[], env);
    let err = stderr(&output);
    assert!(!err.contains("nothing to do"), "{err}");
    assert_eq!(ok_summary(output)["hub"], meta["hub"]);
}

#[test]
fn openwebtext_is_the_whole_main_branch_set_in_order_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = dir.path().join("tok.json");
    let tok = word_tokenizer(&tok_path, 300);
    let (files, docs) = small_openwebtext(dir.path(), 3, 0);
    let (old_files, old_docs) = small_openwebtext(dir.path(), 2, 1000);
    let old_commit = "fedcba9876543210fedcba9876543210fedcba98";
    let revisions = vec![
        Revision::new("main", hub::COMMIT, files),
        Revision::new("v0", old_commit, old_files),
    ];
    let hub = hub_with(OWT, revisions, &tok_path, Duration::ZERO);
    // The second file fails twice: retried, with back-off.
    let second = "data/train-00001-of-00003.parquet";
    hub.failing.lock().unwrap().insert(second.into(), 2);
    let home = dir.path().join("hf_home");
    let home = home.to_str().unwrap();
    let online = [("HF_ENDPOINT", hub.url.as_str()), ("HF_HOME", home)];

    let output = prepare_owt(&[], &online);
    let err = stderr(&output);
    let meta = ok_summary(output);
    assert!(err.contains("retrying in 1 s (attempt 1 of 4)"), "{err}");
    let shards = PathBuf::from(home).join("hub/bsfa-train/openwebtext-gpt2");
    let expected = stream(&tok, &docs);
    let (train, val) = (
        split_ids(&shards, &meta, "train"),
        split_ids(&shards, &meta, "val"),
    );
    assert!(
        [train.clone(), val.clone()].concat() == expected,
        "not the documents in order"
    );
    // Validation: the last --val-tokens tokens, from the first document start in them.
    assert_eq!(val[0], 299);
    assert!(val.len() <= 200 && val.len() > 200 - 62, "{}", val.len());
    assert_eq!(
        meta["splits"]["train"]["shards"][0],
        "openwebtext_train_000001.bin"
    );
    // Counts: what was written, beside the published size (far off here: a warning).
    let count = |split: &str, what: &str| meta["splits"][split][what].as_u64().unwrap();
    assert_eq!(count("train", "documents") + count("val", "documents"), 60);
    assert_eq!(count("train", "tokens") as usize, train.len());
    assert_eq!(
        count("val", "documents") as usize,
        val.iter().filter(|&&t| t == 299).count()
    );
    assert!(err.contains("wrote 60 documents ("), "{err}");
    assert!(
        err.contains("warning: documents: 60 written, 8,013,769 published"),
        "{err}"
    );
    assert_eq!(meta["published"]["warnings"].as_array().unwrap().len(), 2);
    assert_eq!(meta["published"]["documents"]["train"], 8_013_769);
    // The commit and the files it used.
    assert_eq!(meta["hub"]["commit"], hub::COMMIT);
    let names: Vec<String> = (0..3)
        .map(|f| format!("data/train-{f:05}-of-00003.parquet"))
        .collect();
    assert_eq!(meta["hub"]["files"], serde_json::json!(names));

    prepares_again_without_a_hub_record(&shards, &meta, &online);

    // Offline, the same revision comes from the hub cache alone.
    let cached = dir.path().join("cached");
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", home)];
    let again = ok_summary(prepare_owt(&["--out", cached.to_str().unwrap()], &offline));
    assert_eq!(again["splits"], meta["splits"]);
    assert_eq!(again["hub"], meta["hub"]);

    // A pinned revision reads that commit's files.
    let old = dir.path().join("old");
    let pinned = ok_summary(prepare_owt(
        &["--revision", "v0", "--out", old.to_str().unwrap()],
        &online,
    ));
    assert_eq!(pinned["hub"]["commit"], old_commit);
    assert_eq!(pinned["revision"], "v0");
    let all = [
        split_ids(&old, &pinned, "train"),
        split_ids(&old, &pinned, "val"),
    ]
    .concat();
    assert!(
        all == stream(&tok, &old_docs),
        "not the pinned commit's documents"
    );
}

#[test]
fn incomplete_sets_partial_conversions_and_failed_downloads_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = dir.path().join("tok.json");
    word_tokenizer(&tok_path, 300);
    let (files, _) = small_openwebtext(dir.path(), 3, 0);
    let mut incomplete = files.clone();
    incomplete.remove("data/train-00001-of-00003.parquet");
    let partial = HashMap::from([(
        "plain_text/partial-train/0000.parquet".to_string(),
        files["data/train-00000-of-00003.parquet"].clone(),
    )]);
    let revisions = vec![
        Revision::new("main", hub::COMMIT, files),
        Revision::new(
            "gap",
            "1111111111111111111111111111111111111111",
            incomplete,
        ),
        Revision::new(
            "refs/convert/parquet",
            "2222222222222222222222222222222222222222",
            partial,
        ),
    ];
    let hub = hub_with(OWT, revisions, &tok_path, Duration::ZERO);
    let home = dir.path().join("hf_home");
    let online = [
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HOME", home.to_str().unwrap()),
    ];
    fails(
        prepare_owt(&["--revision", "gap"], &online),
        &[
            "'data/train-00001-of-00003.parquet' is missing",
            "--revision",
        ],
    );
    fails(
        prepare_owt(&["--revision", "refs/convert/parquet"], &online),
        &[
            "plain_text/partial-train/0000.parquet",
            "about 5 GB",
            "--data parquet:DIR",
        ],
    );
    // A download that keeps failing: retried, then an error naming the file and the remedy.
    let second = "data/train-00001-of-00003.parquet";
    hub.failing.lock().unwrap().insert(second.into(), 100);
    let message = fails(
        prepare_owt(&[], &online),
        &[
            second,
            "after 4 attempt(s)",
            "Run the same command again to resume",
        ],
    );
    assert_eq!(hub.requests_for(second), 4, "{message}");
}

/// Shard and meta files of a prepared folder, by name; the run's own figures (time, rate,
/// resumed files) left out of `meta.json`.
fn prepared_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let mut bytes = std::fs::read(&p).unwrap();
            if name == "meta.json" {
                let mut meta: Value = serde_json::from_slice(&bytes).unwrap();
                for run_figure in ["seconds", "tokens_per_s", "resumed_files"] {
                    meta.as_object_mut().unwrap().remove(run_figure);
                }
                bytes = meta.to_string().into_bytes();
            }
            (name, bytes)
        })
        .collect();
    files.sort();
    files
}

/// The resumed folder `ours` holds the same shard and meta files, byte for byte, as the
/// uninterrupted `theirs`.
fn same_files(ours: &Path, theirs: &Path) {
    let (ours, theirs) = (prepared_files(ours), prepared_files(theirs));
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs));
    assert!(
        ours == theirs,
        "the resumed shards differ from the uninterrupted ones"
    );
}

#[test]
fn a_killed_prepare_resumes_to_the_same_bytes_without_downloading_again() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = dir.path().join("tok.json");
    word_tokenizer(&tok_path, 300);
    let (files, _) = small_openwebtext(dir.path(), 3, 0);
    let main = || vec![Revision::new("main", hub::COMMIT, files.clone())];
    let (first, second) = (
        "data/train-00000-of-00003.parquet",
        "data/train-00001-of-00003.parquet",
    );
    let prepare = |hub: &Hub, home: &Path| {
        let env = [
            ("HF_ENDPOINT", hub.url.as_str()),
            ("HF_HOME", home.to_str().unwrap()),
        ];
        prepare_owt(&[], &env)
    };
    // The uninterrupted reference.
    let reference = hub_with(OWT, main(), &tok_path, Duration::ZERO);
    let reference_home = dir.path().join("reference");
    ok(prepare(&reference, &reference_home));

    // kill -9 while the second file downloads (the stand-in holds its request), once the
    // first is recorded as done.
    let hub = hub_with(OWT, main(), &tok_path, Duration::ZERO);
    hub.stalled.lock().unwrap().insert(second.into());
    let home = dir.path().join("interrupted");
    let shards = home.join("hub/bsfa-train/openwebtext-gpt2");
    let args = [
        "prepare",
        "--data",
        "openwebtext",
        "--shard-tokens",
        "150",
        "--val-tokens",
        "200",
    ];
    let mut child = hub_free(&args)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", &home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let files_done = || -> Option<u64> {
        let text = std::fs::read_to_string(shards.join("prepare-journal.json")).ok()?;
        serde_json::from_str::<Value>(&text).ok()?["files_done"].as_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while (files_done() != Some(1) || hub.requests_for(second) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        files_done(),
        Some(1),
        "the first file was never recorded as done"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    hub.stalled.lock().unwrap().clear();

    // Again, aborting (as kill -9 would) right after writing a shard of the second file:
    // that shard is past the journal's last record.
    let output = run_hub_free(
        &args,
        &[
            ("HF_ENDPOINT", hub.url.as_str()),
            ("HF_HOME", home.to_str().unwrap()),
            ("BSFA_TRAIN_FAILPOINT", "prepare-shard:1"),
            ("BSFA_TRAIN_TEST_HOOKS", "1"),
        ],
    );
    assert!(
        !output.status.success() && stderr(&output).contains("failpoint"),
        "{}",
        stderr(&output)
    );
    assert_eq!(files_done(), Some(1));

    // What a kill in the middle of writing leaves: temporaries, a carry no journal names.
    for stray in [
        "openwebtext_train_000009.bin.tmp",
        "prepare-carry-000007.bin",
    ] {
        std::fs::write(shards.join(stray), b"torn").unwrap();
    }
    let output = ok(prepare(&hub, &home));
    let err = stderr(&output);
    assert!(err.contains("1 of 3 input files were done"), "{err}");
    assert_eq!(summary(&output)["resumed_files"], 1);
    same_files(
        &shards,
        &reference_home.join("hub/bsfa-train/openwebtext-gpt2"),
    );
    // The first file was downloaded once, as by the uninterrupted run.
    assert_eq!(hub.requests_for(first), reference.requests_for(first));
    assert!(hub.requests_for(first) > 0);
}
