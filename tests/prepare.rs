//! `prepare` of local data: text and parquet into llm.c shards (checked with a reader
//! written from the format's definition), loaded back exactly, and every bad input.
//! (`tests/prepare_hub.rs` prepares named datasets from the hub.)

mod common;

use bsfa_train::data::parquet_text::write_string_column;
use bsfa_train::data::{Batcher, TokenSegments, Tokenizer};
use common::data::{encode, read_shard, run_hub_free, split_ids, word_tokenizer};
use common::{fails, ok_summary, stderr};
use serde_json::Value;

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
    let meta = ok_summary(run_hub_free(&args, &[]));
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
    let again = ok_summary(run_hub_free(&args, &[]));
    assert_eq!(again["splits"], meta["splits"]);
    assert!(!out.join("books_train_000009.bin.tmp").exists());
    assert!(!out.join("books_train_000009.bin").exists());
    // Complete: a re-run does nothing.
    let o = run_hub_free(&args, &[]);
    assert!(stderr(&o).contains("nothing to do"));
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
    let meta = ok_summary(run_hub_free(
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
        run_hub_free(
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
        run_hub_free(
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

/// `prepare` replaces only a `meta.json` it wrote: anyone else's stops it before it reads its
/// input, named, and stays as it was.
#[test]
fn a_meta_json_prepare_did_not_write_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("a.txt");
    std::fs::write(&text, "some text to prepare. ".repeat(200)).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let foreign = r#"{"experiment": "mine", "notes": "not a prepare summary"}"#;
    std::fs::write(out.join("meta.json"), foreign).unwrap();
    let spec = format!("text:{}", text.display());
    let prepare = || {
        let args = ["prepare", "--data", &spec, "--tokenizer", "bytes", "--out"];
        run_hub_free(&[&args[..], &[out.to_str().unwrap()]].concat(), &[])
    };
    fails(
        prepare(),
        &[
            "meta.json",
            "not written by `prepare`",
            "move that file away",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("meta.json")).unwrap(),
        foreign
    );
    // Its own summary, of another request, it replaces.
    std::fs::remove_file(out.join("meta.json")).unwrap();
    ok_summary(prepare());
    let other = format!("text:{}", dir.path().display());
    let args = ["prepare", "--data", &other, "--tokenizer", "bytes", "--out"];
    ok_summary(run_hub_free(
        &[&args[..], &[out.to_str().unwrap()]].concat(),
        &[],
    ));
}

/// An empty text is an error naming it, for `prepare` and `tokenizer` alike; so is a
/// vocabulary the BPE trainer cannot reserve.
#[test]
fn empty_texts_and_huge_vocabularies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let spec = format!("text:{}", empty.display());
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let needles = ["empty.txt' is empty", "no text to read"];
    let prepare = [
        "prepare",
        "--data",
        &spec,
        "--tokenizer",
        "bytes",
        "--out",
        out,
    ];
    fails(run_hub_free(&prepare, &[]), &needles);
    let tok = dir.path().join("tokenizer.json");
    let tok = tok.to_str().unwrap();
    let tokenizer = [
        "tokenizer",
        "--data",
        &spec,
        "--vocab-size",
        "300",
        "--out",
        tok,
    ];
    fails(run_hub_free(&tokenizer, &[]), &needles);
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "a few words of text. ".repeat(50)).unwrap();
    let spec = format!("text:{}", text.display());
    let huge = ["tokenizer", "--data", &spec, "--vocab-size", "100000000000"];
    fails(
        run_hub_free(&[&huge[..], &["--out", tok]].concat(), &[]),
        &[
            "--vocab-size 100000000000",
            "limit of 4194304",
            "smaller --vocab-size",
        ],
    );
}

/// One shard file has no validation shards beside it: training on it alone is an error
/// naming the fix, not a validation loss measured on the training tokens.
#[test]
fn one_shard_file_needs_its_validation_data_named() {
    use bsfa_train::data::shards;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = bsfa_train::data::builtin::corpus()
        .bytes()
        .take(30_000)
        .map(u32::from)
        .collect();
    let (train, val) = (dir.path().join("t.bin"), dir.path().join("v.bin"));
    shards::write(&train, &ids[..25_000], 256).unwrap();
    shards::write(&val, &ids[25_000..], 256).unwrap();
    let out = dir.path().join("run");
    let data = format!("shards:{}", train.display());
    let args = [
        "--model",
        "test",
        "--steps",
        "2",
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
    ];
    fails(
        run_hub_free(&args, &[]),
        &["t.bin is one shard file", "--val-data shards:FILE"],
    );
    let val = format!("shards:{}", val.display());
    let o = run_hub_free(&[&args[..], &["--val-data", &val]].concat(), &[]);
    assert!(
        stderr(&o).contains("25000 train / 5000 val tokens"),
        "{}",
        stderr(&o)
    );
    ok_summary(o);
}
