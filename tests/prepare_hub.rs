//! `prepare` of named datasets: the hub download path against a local stand-in server,
//! training offline from the prepared cache, offline errors, and ranks that prepare once.

mod common;

use bsfa_train::data::parquet_text::write_string_column;
use common::data::{encode, hub_free, run_hub_free, split_ids, word_tokenizer};
use common::hub::{self, hub_with, Hub, Revision};
use common::ranks::stops_before_training;
use common::{fails, ok_summary, stderr, test_model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
