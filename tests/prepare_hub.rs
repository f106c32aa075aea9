//! `prepare` of named datasets: the hub download path against a local stand-in server,
//! training offline from the prepared cache, offline errors, and ranks that prepare once.

mod common;

use bsfa_train::data::parquet_text::write_string_column;
use common::data::{encode, hub_free, run_hub_free, split_ids, word_tokenizer};
use common::hub::{self, Hub, Repository, Revision};
use common::ranks::stops_before_training;
use common::{fails, ok, ok_summary, stderr, summary, test_model};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The stand-in hub serving `dataset` (a repository id such as `datasets/Salesforce/wikitext`)
/// at `revisions`, and the model `gpt2` with `tokenizer` as its `tokenizer.json`.
fn hub_with(dataset: &str, revisions: Vec<Revision>, tokenizer: &Path, delay: Duration) -> Hub {
    let gpt2 = HashMap::from([(
        "tokenizer.json".to_string(),
        std::fs::read(tokenizer).unwrap(),
    )]);
    hub::serve(
        vec![
            Repository {
                id: dataset.into(),
                revisions,
            },
            Repository {
                id: "gpt2".into(),
                revisions: vec![Revision::new("main", hub::COMMIT, gpt2)],
            },
        ],
        Duration::from_secs(240),
        delay,
    )
}

/// The stand-in hub serving `small_wikitext`'s files at `main`.
fn wikitext_hub(dir: &Path, files: HashMap<String, Vec<u8>>, delay: Duration) -> Hub {
    let main = Revision::new("main", hub::COMMIT, files);
    hub_with(
        "datasets/Salesforce/wikitext",
        vec![main],
        &dir.join("tok.json"),
        delay,
    )
}

/// A small WikiText-103 as the hub serves it (three parquet splits, and another config of
/// the repository that must not be read), with the `gpt2` tokenizer: a word tokenizer of
/// 300 tokens (`dir/tok.json`). Returns the files, the tokenizer and the articles (rows) in
/// split order:
/// 26 train, 2 validation, 2 test.
fn small_wikitext(
    dir: &Path,
) -> (
    HashMap<String, Vec<u8>>,
    tokenizers::Tokenizer,
    Vec<Vec<String>>,
) {
    let tok_path = dir.join("tok.json");
    let tok = word_tokenizer(&tok_path, 300);
    // WikiText rows are lines; ` = Title = ` starts an article.
    let articles: Vec<Vec<String>> = (0..30)
        .map(|a| {
            let mut rows = vec![format!(" = w{a} = \n"), String::new()];
            rows.extend((0..20).map(|l| format!(" w{} w{} w{} \n", (a + l) % 290, l, a)));
            rows.push(" = = w5 = = \n".into());
            rows
        })
        .collect();
    let train_rows: Vec<&str> = articles[..26]
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let val_rows: Vec<&str> = articles[26..28]
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let test_rows: Vec<&str> = articles[28..]
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut files = HashMap::new();
    for (name, rows) in [
        ("train-00000-of-00001", &train_rows),
        ("validation-00000-of-00001", &val_rows),
        ("test-00000-of-00001", &test_rows),
    ] {
        let path = dir.join(format!("{name}.parquet"));
        write_string_column(&path, "text", rows, 50).unwrap();
        files.insert(
            format!("wikitext-103-raw-v1/{name}.parquet"),
            std::fs::read(&path).unwrap(),
        );
    }
    // Another config of the same repository, which must not be read.
    files.insert(
        "wikitext-2-raw-v1/train-00000-of-00001.parquet".into(),
        vec![0; 8],
    );
    (files, tok, articles)
}

#[test]
fn wikitext103_downloads_from_the_hub_prepares_once_and_trains_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (files, tok, articles) = small_wikitext(dir.path());
    let hub = wikitext_hub(dir.path(), files, Duration::ZERO);
    let endpoint = hub.url.clone();
    let home = dir.path().join("hf_home");
    let home = home.to_str().unwrap();
    let online = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HOME", home)];

    let meta = ok_summary(run_hub_free(
        &["prepare", "--data", "wikitext103", "--shard-tokens", "500"],
        &online,
    ));
    let shards = PathBuf::from(home).join("hub/bsfa-train/wikitext103-gpt2");
    let eot = 299;
    let expect = |articles: &[Vec<String>]| -> Vec<u32> {
        articles
            .iter()
            .flat_map(|rows| std::iter::once(eot).chain(encode(&tok, &rows.concat())))
            .collect()
    };
    assert_eq!(split_ids(&shards, &meta, "train"), expect(&articles[..26]));
    assert_eq!(split_ids(&shards, &meta, "val"), expect(&articles[26..28]));
    assert_eq!(split_ids(&shards, &meta, "test"), expect(&articles[28..]));
    assert_eq!(meta["splits"]["train"]["documents"], 26);

    // Training finds the prepared shards in the cache, with the hub out of reach.
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", home)];
    let out = dir.path().join("run");
    let train = wikitext_run(&out, &[]);
    let summary = ok_summary(run_hub_free(&train, &offline));
    assert_eq!(summary["steps"], 2);

    // Offline with an empty cache: the dataset and the command to prepare it are named.
    let empty_home = dir.path().join("empty_home");
    let empty_home = empty_home.to_str().unwrap();
    let with_bytes: Vec<&str> = train
        .iter()
        .map(|a| if a == "gpt2" { "bytes" } else { a.as_str() })
        .collect();
    fails(
        run_hub_free(
            &with_bytes,
            &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", empty_home)],
        ),
        &[
            "dataset 'wikitext103' is not prepared",
            "bsfa-train prepare --data wikitext103",
        ],
    );
    fails(
        run_hub_free(&train, &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", empty_home)]),
        &[
            "tokenizer 'gpt2' is not in the local Hugging Face cache",
            "HF_HUB_OFFLINE",
        ],
    );
    // The network unreachable: the same advice.
    fails(
        run_hub_free(
            &[
                "prepare",
                "--data",
                "wikitext103",
                "--tokenizer",
                "bytes",
                "--out",
                out.to_str().unwrap(),
            ],
            &[
                ("HF_ENDPOINT", "http://127.0.0.1:9"),
                ("HF_HOME", empty_home),
            ],
        ),
        &[
            "cannot download dataset 'wikitext103'",
            "bsfa-train prepare --data wikitext103",
        ],
    );
}

/// A 2-step run of the test model on `wikitext103` with the `gpt2` tokenizer, into `out`,
/// in batches of 2 sequences of 16 tokens (the stand-in WikiText is small).
fn wikitext_run(out: &Path, extra: &[&str]) -> Vec<String> {
    let out = out.display().to_string();
    let run = [
        "--data",
        "wikitext103",
        "--tokenizer",
        "gpt2",
        "--set",
        "model.vocab_size=320",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-batches",
        "1",
        "--steps",
        "2",
    ];
    test_model(&[&run[..], extra, &["--out", &out]].concat())
}

/// The ranks of a job prepare a named dataset before they join, so preparing may take far
/// longer than `--dist-timeout`; one rank prepares, the others wait for it, and a signal
/// ends that wait at once.
#[test]
fn ranks_prepare_once_before_joining_and_a_signal_ends_their_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _, _) = small_wikitext(dir.path());
    // Each request takes 1.5 s: preparing takes several times the 3 s bound on joining.
    let hub = wikitext_hub(dir.path(), files, Duration::from_millis(1500));
    let endpoint = hub.url.clone();
    let home = dir.path().join("hf_home");
    let home = home.to_str().unwrap();
    let out = dir.path().join("run");
    let two = ["--nproc-per-node", "2", "--dist-timeout", "3"];
    let train = |out: &Path| wikitext_run(out, &two);
    let started = Instant::now();
    let output = run_hub_free(
        &train(&out),
        &[("HF_ENDPOINT", &endpoint), ("HF_HOME", home)],
    );
    let took = started.elapsed();
    let stderr = stderr(&output);
    let summary = ok_summary(output);
    assert_eq!(summary["ranks"], 2);
    assert!(
        took > Duration::from_secs(6),
        "preparing took only {took:?}"
    );
    assert_eq!(
        stderr.matches("preparing 'wikitext103'").count(),
        1,
        "{stderr}"
    );
    // Every rank reuses the shards, with the hub out of reach.
    let again = dir.path().join("again");
    let output = run_hub_free(
        &train(&again),
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home)],
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("preparing"));
    assert_eq!(ok_summary(output)["ranks"], 2);

    // Another process prepares (it holds the lock): a SIGTERM ends the wait.
    let fresh = dir.path().join("fresh_home");
    let lock_path = fresh.join("hub/bsfa-train/wikitext103-gpt2.lock");
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();
    let child = hub_free(&train(&dir.path().join("waits")))
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &fresh)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let stopped_in = stops_before_training(child, "waiting for the preparing process");
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
}

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

    // A folder prepared before #27 (no record of the hub files read: OpenWebText's were the
    // partial conversion) is not taken as prepared: it is prepared again.
    let meta_path = shards.join("meta.json");
    let mut old_meta: Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    old_meta.as_object_mut().unwrap().remove("hub");
    std::fs::write(&meta_path, old_meta.to_string()).unwrap();
    let output = prepare_owt(&[], &online);
    assert!(
        !stderr(&output).contains("nothing to do"),
        "{}",
        stderr(&output)
    );
    assert_eq!(ok_summary(output)["hub"], meta["hub"]);

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
    let reference_shards = reference_home.join("hub/bsfa-train/openwebtext-gpt2");
    let (ours, theirs) = (prepared_files(&shards), prepared_files(&reference_shards));
    assert_eq!(
        ours.iter().map(|f| &f.0).collect::<Vec<_>>(),
        theirs.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(
        ours == theirs,
        "the resumed shards differ from the uninterrupted ones"
    );
    // The first file was downloaded once, as by the uninterrupted run.
    assert_eq!(hub.requests_for(first), reference.requests_for(first));
    assert!(hub.requests_for(first) > 0);
}
