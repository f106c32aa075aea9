//! `prepare` and named datasets: text and parquet into llm.c shards (checked with a reader
//! written from the format's definition), the hub download path against a local stand-in
//! server, offline errors, and every bad input.

use bsfa_train::data::parquet_text::write_string_column;
use bsfa_train::data::{Batcher, TokenSegments, Tokenizer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bsfa-train");

fn bsfa(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("binary runs")
}

fn ok(o: Output) -> Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

fn fails(o: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
}

/// Header and ids of an llm.c shard, from the format's definition alone.
fn read_shard(path: &Path) -> ([i32; 3], Vec<u32>) {
    let b = std::fs::read(path).unwrap();
    let int = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let header = [int(0), int(1), int(2)];
    assert!((3..256).all(|i| int(i) == 0));
    let width = if header[0] == 20240520 { 2 } else { 4 };
    let ids: Vec<u32> = b[1024..]
        .chunks(width)
        .map(|c| {
            if width == 2 {
                u16::from_le_bytes([c[0], c[1]]) as u32
            } else {
                u32::from_le_bytes(c.try_into().unwrap())
            }
        })
        .collect();
    assert_eq!(ids.len(), header[2] as usize, "{}", path.display());
    (header, ids)
}

/// Every id of a split, shard after shard, in name order.
fn split_ids(dir: &Path, meta: &Value, split: &str) -> Vec<u32> {
    meta["splits"][split]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| read_shard(&dir.join(f.as_str().unwrap())).1)
        .collect()
}

/// A word-level tokenizer over `w0 .. w{n-2}` plus `<|endoftext|>` (id n-1).
fn word_tokenizer(path: &Path, n: u32) -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let mut vocab: HashMap<String, u32> = (0..n - 1).map(|i| (format!("w{i}"), i)).collect();
    vocab.insert("<|endoftext|>".into(), n - 1);
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(path, false).unwrap();
    tok
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// Our writer and reader against the format's definition, in both id widths.
#[test]
fn shards_follow_the_llm_c_format_in_both_widths() {
    use bsfa_train::data::shards::{self, Shard};
    let dir = tempfile::tempdir().unwrap();
    for (vocab, ids) in [
        (65536usize, vec![0u32, 1, 50256, 65535]),
        (128256, vec![0u32, 70000, 128255]),
    ] {
        let path = dir.path().join(format!("x_val_{vocab}.bin"));
        shards::write(&path, &ids, vocab).unwrap();
        let (header, raw) = read_shard(&path);
        let expected = if vocab > 65536 {
            [20240801, 7, ids.len() as i32]
        } else {
            [20240520, 1, ids.len() as i32]
        };
        assert_eq!(header, expected);
        assert_eq!(raw, ids);
        let shard = Shard::open(&path).unwrap();
        let mut out = Vec::new();
        shard.read(1, ids.len() - 1, &mut out);
        assert_eq!(out, ids[1..]);
        shard.check_vocab(vocab).unwrap();
        let err = shard.check_vocab(10).unwrap_err().to_string();
        assert!(err.contains("outside the model's vocabulary"), "{err}");
    }
}

#[test]
fn text_folder_round_trip_with_held_out_validation() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("books");
    std::fs::create_dir(&src).unwrap();
    let docs: Vec<String> = (0..3)
        .map(|i| format!("book {i}: ").repeat(300 + 50 * i))
        .collect();
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(src.join(format!("{i}.txt")), d).unwrap();
    }
    std::fs::write(src.join("notes.md"), "not a .txt: skipped").unwrap();
    let out = dir.path().join("shards");
    let spec = format!("text:{}", src.display());
    let args = [
        "prepare",
        "--data",
        &spec,
        "--tokenizer",
        "bytes",
        "--out",
        out.to_str().unwrap(),
        "--shard-tokens",
        "4000",
        "--val-tokens",
        "3000",
    ];
    let meta = ok(bsfa(&args, &[]));
    // The stream by definition: a newline before every document, then its bytes.
    let expected: Vec<u32> = docs
        .iter()
        .flat_map(|d| std::iter::once(10).chain(d.bytes().map(u32::from)))
        .collect();
    let train = split_ids(&out, &meta, "train");
    let val = split_ids(&out, &meta, "val");
    assert_eq!([train.clone(), val.clone()].concat(), expected);
    // The tail from a document start (the separator): here the last document, which is
    // longer than --val-tokens.
    assert_eq!(val[0], 10);
    assert_eq!(val.len(), 1 + docs[2].len());
    let names: Vec<&str> = meta["splits"]["train"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names[0], "books_train_000001.bin");
    assert_eq!(read_shard(&out.join(names[0])).0, [20240520, 1, 4000]);
    assert!(meta["val_held_out"].as_bool().unwrap());
    assert_eq!(
        serde_json::from_str::<Value>(&std::fs::read_to_string(out.join("meta.json")).unwrap())
            .unwrap()["splits"],
        meta["splits"]
    );

    // The loader's windows over the shards are exactly stretches of that stream.
    let spec = format!("shards:{}", out.display()).parse().unwrap();
    let tokens = TokenSegments::open(&spec, &Tokenizer::Bytes, "train", 256).unwrap();
    let offsets: Vec<usize> = tokens
        .segment_lens()
        .iter()
        .scan(0, |acc, n| {
            let at = *acc;
            *acc += n;
            Some(at)
        })
        .collect();
    let mut batcher = Batcher::new(&tokens, 5);
    for _ in 0..200 {
        let (segment, start) = batcher.draw(64);
        let mut window = Vec::new();
        tokens.read(segment, start, 65, &mut window);
        let at = offsets[segment] + start;
        assert_eq!(window, expected[at..at + 65]);
    }

    // Leftovers of an interrupted run (a temp shard, no meta.json) are cleared on a re-run.
    std::fs::remove_file(out.join("meta.json")).unwrap();
    std::fs::write(out.join("books_train_000009.bin.tmp"), b"partial").unwrap();
    std::fs::write(out.join("books_train_000009.bin"), b"stale").unwrap();
    let again = ok(bsfa(&args, &[]));
    assert_eq!(again["splits"], meta["splits"]);
    assert!(!out.join("books_train_000009.bin.tmp").exists());
    assert!(!out.join("books_train_000009.bin").exists());
    // Complete: a re-run does nothing.
    let o = bsfa(&args, &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to do"));
}

#[test]
fn parquet_splits_come_from_file_names_and_large_vocabularies_use_u32() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("corpus").join("plain");
    std::fs::create_dir_all(&src).unwrap();
    let train_rows: Vec<String> = (0..40)
        .map(|i| format!("w{} w{} w7", i, i + 70_000))
        .collect();
    let val_rows = ["w1 w2", "w69999 w3"];
    let refs: Vec<&str> = train_rows.iter().map(String::as_str).collect();
    write_string_column(&src.join("train-00000-of-00001.parquet"), "text", &refs, 7).unwrap();
    write_string_column(
        &src.join("validation-00000-of-00001.parquet"),
        "text",
        &val_rows,
        7,
    )
    .unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    let tok = word_tokenizer(&tok_path, 80_001);
    let out = dir.path().join("shards");
    let spec = format!("parquet:{}", dir.path().join("corpus").display());
    let meta = ok(bsfa(
        &[
            "prepare",
            "--data",
            &spec,
            "--tokenizer",
            tok_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shard-tokens",
            "50",
        ],
        &[],
    ));
    let eot = 80_000u32;
    let expect = |rows: &[&str]| -> Vec<u32> {
        rows.iter()
            .flat_map(|r| std::iter::once(eot).chain(encode(&tok, r)))
            .collect()
    };
    assert_eq!(split_ids(&out, &meta, "train"), expect(&refs));
    assert_eq!(split_ids(&out, &meta, "val"), expect(&val_rows));
    assert!(!meta["val_held_out"].as_bool().unwrap());
    let first = meta["splits"]["train"]["shards"][0].as_str().unwrap();
    assert_eq!(first, "corpus_train_000001.bin");
    assert_eq!(read_shard(&out.join(first)).0, [20240801, 7, 50]);
    assert_eq!(meta["document_separator"]["token"], "<|endoftext|>");
}

#[test]
fn bad_sources_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let prepare = |data: &str, tokenizer: &str| {
        bsfa(
            &[
                "prepare",
                "--data",
                data,
                "--tokenizer",
                tokenizer,
                "--out",
                out,
            ],
            &[],
        )
    };
    fails(
        prepare(&format!("text:{}", empty.display()), "bytes"),
        &["holds no .txt files"],
    );
    fails(
        prepare(&format!("parquet:{}", empty.display()), "bytes"),
        &["holds no parquet files"],
    );
    let no_text = dir.path().join("no_text");
    std::fs::create_dir(&no_text).unwrap();
    write_string_column(&no_text.join("train-0.parquet"), "content", &["a"], 1).unwrap();
    fails(
        prepare(&format!("parquet:{}", no_text.display()), "bytes"),
        &["train-0.parquet", "no 'text' column"],
    );
    let bad_tok = dir.path().join("tokenizer.json");
    std::fs::write(&bad_tok, "{ this is not a tokenizer").unwrap();
    fails(
        prepare("text:/etc/hostname", bad_tok.to_str().unwrap()),
        &["cannot load tokenizer", "tokenizer.json"],
    );
    fails(
        prepare("wikipedia", "bytes"),
        &["unknown source 'wikipedia'"],
    );
    // Training from an empty shard folder.
    fails(
        bsfa(
            &[
                "--data",
                &format!("shards:{}", empty.display()),
                "--out",
                out,
            ],
            &[],
        ),
        &["no '*_train_*.bin' shards"],
    );
}

/// A stand-in for the hub on 127.0.0.1: serves `files` (repository path -> bytes) of the
/// dataset `Salesforce/wikitext` and `tokenizer.json` of the model `gpt2`, with the headers
/// hf-hub needs, each request answered after `delay`. It stops by itself after `lifetime`.
fn hub_server(files: HashMap<String, Vec<u8>>, lifetime: Duration, delay: Duration) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let commit = "0123456789abcdef0123456789abcdef01234567";
        while Instant::now() < deadline {
            let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            std::thread::sleep(delay);
            let url = request.url().to_string();
            let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k, v).unwrap();
            if url.starts_with("/api/datasets/Salesforce/wikitext/revision/main") {
                let siblings: Vec<Value> = files
                    .keys()
                    .filter(|k| !k.starts_with("gpt2/"))
                    .map(|k| serde_json::json!({"rfilename": k.trim_start_matches("wikitext/")}))
                    .collect();
                let body = serde_json::json!({"sha": commit, "siblings": siblings}).to_string();
                let _ = request.respond(tiny_http::Response::from_string(body));
                continue;
            }
            let key = url
                .strip_prefix("/datasets/Salesforce/wikitext/resolve/main/")
                .map(|f| format!("wikitext/{f}"))
                .or_else(|| {
                    url.strip_prefix("/gpt2/resolve/main/")
                        .map(|f| format!("gpt2/{f}"))
                });
            let Some(data) = key.and_then(|k| files.get(&k)) else {
                let _ = request.respond(tiny_http::Response::empty(404));
                continue;
            };
            let range = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.to_string())
                .unwrap_or_default();
            let spec = range.trim_start_matches("bytes=");
            let (start, end) = match spec.split_once('-') {
                Some((a, b)) => (
                    a.parse().unwrap_or(0),
                    b.parse().unwrap_or(data.len() - 1).min(data.len() - 1),
                ),
                None => (0, data.len() - 1),
            };
            let etag = format!(
                "{:016x}{:08x}",
                data.len(),
                data.iter().map(|&b| b as u32).sum::<u32>()
            );
            let response = tiny_http::Response::from_data(data[start..=end].to_vec())
                .with_status_code(206)
                .with_header(header("ETag", &format!("\"{etag}\"")))
                .with_header(header("X-Repo-Commit", commit))
                .with_header(header(
                    "Content-Range",
                    &format!("bytes {start}-{end}/{}", data.len()),
                ));
            let _ = request.respond(response);
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// A small WikiText-103 as the hub serves it (three parquet splits, and another config of
/// the repository that must not be read), with the `gpt2` tokenizer: a word tokenizer of
/// 300 tokens. Returns the files, the tokenizer and the articles (rows) in split order:
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
            format!("wikitext/wikitext-103-raw-v1/{name}.parquet"),
            std::fs::read(&path).unwrap(),
        );
    }
    // Another config of the same repository, which must not be read.
    files.insert(
        "wikitext/wikitext-2-raw-v1/train-00000-of-00001.parquet".into(),
        vec![0; 8],
    );
    files.insert(
        "gpt2/tokenizer.json".into(),
        std::fs::read(&tok_path).unwrap(),
    );
    (files, tok, articles)
}

#[test]
fn wikitext103_downloads_from_the_hub_prepares_once_and_trains_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (files, tok, articles) = small_wikitext(dir.path());
    let endpoint = hub_server(files, Duration::from_secs(120), Duration::ZERO);
    let home = dir.path().join("hf_home");
    let home = home.to_str().unwrap();
    let online = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HOME", home)];

    let meta = ok(bsfa(
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
    let train: Vec<&str> = train.iter().map(String::as_str).collect();
    let summary = ok(bsfa(&train, &offline));
    assert_eq!(summary["steps"], 2);

    // Offline with an empty cache: the dataset and the command to prepare it are named.
    let empty_home = dir.path().join("empty_home");
    let empty_home = empty_home.to_str().unwrap();
    let mut with_bytes = train.to_vec();
    with_bytes[3] = "bytes";
    fails(
        bsfa(
            &with_bytes,
            &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", empty_home)],
        ),
        &[
            "dataset 'wikitext103' is not prepared",
            "bsfa-train prepare --data wikitext103",
        ],
    );
    fails(
        bsfa(&train, &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", empty_home)]),
        &[
            "tokenizer 'gpt2' is not in the local Hugging Face cache",
            "HF_HUB_OFFLINE",
        ],
    );
    // The network unreachable: the same advice.
    fails(
        bsfa(
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

/// A 2-step run of a small LLaMA on `wikitext103` with the `gpt2` tokenizer, into `out`.
fn wikitext_run(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut run: Vec<String> = [
        "--data",
        "wikitext103",
        "--tokenizer",
        "gpt2",
        "--set",
        "model.vocab_size=320",
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.num_hidden_layers=1",
        "--set",
        "model.intermediate_size=64",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-batches",
        "1",
        "--steps",
        "2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    run.extend(["--out".into(), out.display().to_string()]);
    run
}

/// The ranks of a job prepare a named dataset before they join, so preparing may take far
/// longer than `--dist-timeout`; one rank prepares, the others wait for it, and a signal
/// ends that wait at once.
#[test]
fn ranks_prepare_once_before_joining_and_a_signal_ends_their_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _, _) = small_wikitext(dir.path());
    // Each request takes 1.5 s: preparing takes several times the 3 s bound on joining.
    let endpoint = hub_server(files, Duration::from_secs(120), Duration::from_millis(1500));
    let home = dir.path().join("hf_home");
    let home = home.to_str().unwrap();
    let out = dir.path().join("run");
    let two = ["--nproc-per-node", "2", "--dist-timeout", "3"];
    let train = |out: &Path| wikitext_run(out, &two);
    let train_args = train(&out);
    let train_args: Vec<&str> = train_args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let output = bsfa(
        &train_args,
        &[("HF_ENDPOINT", &endpoint), ("HF_HOME", home)],
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let summary = ok(output);
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
    let again_args = train(&again);
    let again_args: Vec<&str> = again_args.iter().map(String::as_str).collect();
    let output = bsfa(&again_args, &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", home)]);
    assert!(!String::from_utf8_lossy(&output.stderr).contains("preparing"));
    assert_eq!(ok(output)["ranks"], 2);

    // Another process prepares (it holds the lock): a SIGTERM ends the wait.
    let fresh = dir.path().join("fresh_home");
    let lock_path = fresh.join("hub/bsfa-train/wikitext103-gpt2.lock");
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();
    let child = Command::new(BIN)
        .args(train(&dir.path().join("waits")))
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", &fresh)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let signalled = Instant::now();
    let output = child.wait_with_output().unwrap();
    let stopped_in = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("stopped by SIGTERM before training started"),
        "{stderr}"
    );
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
}
