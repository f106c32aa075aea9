//! `sample`: the cached engine (candle-transformers' LLaMA with a key/value cache) picks the
//! same greedy tokens as our training model re-run on the whole context; an exported model
//! writes what Hugging Face `transformers` generates for it; training's samples are what
//! `sample` writes from the checkpoint of the same step; bad input is a clear error.

mod common;

use bsfa_train::data::builtin;
use bsfa_train::sample::{Generator, SampleOptions, Stop};
use bsfa_train::train;
use candle_core::Device;
use common::tools::tool;
use common::{ok, records, run as bsfa, BIN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A run folder of `steps` steps of the small test model (samples off unless `sets` asks).
fn trained(dir: &Path, steps: usize, sets: &[&str]) -> PathBuf {
    let out = dir.join("run");
    let steps = format!("train.steps={steps}");
    let mut all = vec![steps.as_str(), "train.sample_every=0"];
    all.extend_from_slice(sets);
    train::run(&common::small_config(&out, &all), None).unwrap();
    out
}

fn greedy(tokens: usize, kv_cache: bool) -> SampleOptions {
    SampleOptions {
        max_new_tokens: tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        kv_cache,
    }
}

fn write(generator: &Generator, prompt: &[u32], options: &SampleOptions) -> Vec<u32> {
    let mut streamed = String::new();
    let sample = generator
        .generate(prompt, options, &mut |piece| {
            streamed.push_str(piece);
            Ok(())
        })
        .unwrap();
    assert_eq!(streamed, sample.text, "the stream adds up to the text");
    sample.ids
}

#[test]
fn cached_and_recomputed_greedy_tokens_agree() {
    // Grouped-query attention with tied embeddings, and the plain layout: both map onto
    // candle-transformers' model.
    for sets in [
        &[
            "model.num_key_value_heads=2",
            "model.tie_word_embeddings=true",
        ][..],
        &[][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = trained(dir.path(), 200, sets);
        let generator = Generator::open(&run, None, &Device::Cpu).unwrap();
        // A prompt of several tokens (the cache's first pass covers them all), and writing
        // past the trained sequence length (64) so positions the cache extends are used.
        let prompt = generator.prompt("alice has ").unwrap();
        let cached = write(&generator, &prompt, &greedy(150, true));
        let recomputed = write(&generator, &prompt, &greedy(150, false));
        assert_eq!(cached.len(), 150);
        assert_eq!(cached, recomputed, "{sets:?}");
        // Trained on the built-in corpus, the model writes its words, not one token over
        // and over (which would make the comparison weak).
        let text = String::from_utf8(cached.iter().map(|&id| id as u8).collect()).unwrap();
        let distinct: std::collections::BTreeSet<_> = cached.iter().collect();
        assert!(text.contains(" has ") && distinct.len() >= 12, "{text:?}");
    }
}

#[test]
fn draws_are_seeded_and_top_k_1_is_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(dir.path(), 20, &[]);
    let generator = Generator::open(&run, None, &Device::Cpu).unwrap();
    let prompt = generator.prompt("bob ").unwrap();
    let draw = |seed, top_k| {
        let options = SampleOptions {
            temperature: 1.0,
            top_k,
            seed,
            ..greedy(80, true)
        };
        write(&generator, &prompt, &options)
    };
    assert_eq!(draw(7, None), draw(7, None), "same seed, same text");
    assert_ne!(draw(7, None), draw(8, None), "another seed, another text");
    assert_eq!(
        draw(7, Some(1)),
        write(&generator, &prompt, &greedy(80, true))
    );
}

#[test]
fn writing_stops_when_the_context_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(
        dir.path(),
        2,
        &["train.seq_len=32", "model.max_position_embeddings=40"],
    );
    let generator = Generator::open(&run, None, &Device::Cpu).unwrap();
    let prompt = generator.prompt(&"x".repeat(36)).unwrap();
    let sample = generator
        .generate(&prompt, &greedy(10, true), &mut |_| Ok(()))
        .unwrap();
    assert_eq!((sample.ids.len(), sample.stop), (4, Stop::Context));
}

#[test]
fn training_samples_are_what_sample_writes_from_the_checkpoint_of_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(
        dir.path(),
        20,
        &[
            "train.sample_every=10",
            "train.sample_tokens=48",
            "train.checkpoint_every=10",
            "train.seed=5",
        ],
    );
    let samples: Vec<Value> = records(&run)
        .into_iter()
        .filter(|v| v.get("sample").is_some())
        .collect();
    assert_eq!(samples.len(), 2);
    for record in &samples {
        let step = record["step"].as_u64().unwrap() as usize;
        let checkpoint = run.join(format!("checkpoints/step-{step:08}"));
        let out = bsfa(&[
            "sample",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--prompt",
            "alice ",
            "--max-new-tokens",
            "48",
            "--temperature",
            "0.8",
            "--top-k",
            "200",
            "--seed",
            "5",
        ]);
        let stdout = String::from_utf8(ok(out).stdout).unwrap();
        assert_eq!(record["sample_prompt"], "alice ");
        let expected = format!("alice {}\n", record["sample"].as_str().unwrap());
        assert_eq!(stdout, expected, "step {step}");
    }
    assert_ne!(samples[0]["sample"], samples[1]["sample"]);
}

#[test]
fn training_samples_reach_the_terminal_with_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = ok(bsfa(&common::test_model(&[
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.sample_prompt=\u{1b}[2J\ralice\tbob",
        "--set",
        "train.sample_tokens=8",
    ])));
    let err = common::stderr(&o);
    let line = err.lines().find(|l| l.contains("sample: ")).expect(&err);
    assert!(
        line.contains("sample: \\u{1b}[2J\\u{d}alice\tbob"),
        "{line}"
    );
    assert!(!line.contains(['\u{1b}', '\r']), "{line:?}");
    // metrics.jsonl keeps the text as it is (JSON escapes it).
    let samples: Vec<Value> = records(&out)
        .into_iter()
        .filter(|v| v.get("sample").is_some())
        .collect();
    assert_eq!(samples[0]["sample_prompt"], "\u{1b}[2J\ralice\tbob");
}

#[test]
fn exported_model_writes_what_transformers_generate_writes() {
    let Some(python) = tool("BSFA_PYTHON", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A BPE tokenizer trained on the built-in corpus, so the export carries a
    // tokenizer.json with an end-of-text token.
    let corpus = dir.path().join("corpus.txt");
    let text: String = builtin::corpus().chars().take(200_000).collect();
    std::fs::write(&corpus, text).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    let made = bsfa(&[
        "tokenizer",
        "--data",
        &format!("text:{}", corpus.display()),
        "--vocab-size",
        "400",
        "--out",
        tokenizer.to_str().unwrap(),
    ]);
    ok(made);
    let run = trained(
        dir.path(),
        40,
        &[
            &format!("data.train=\"text:{}\"", corpus.display()),
            &format!("data.tokenizer=\"{}\"", tokenizer.display()),
            "model.vocab_size=400",
            "model.num_key_value_heads=2",
        ],
    );
    let checkpoint = run.join("checkpoints/step-00000040");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_sample.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--checkpoint", checkpoint.to_str().unwrap()])
        .args(["--prompt", "carol finds the", "--max-new-tokens", "120"])
        .args(["--binary", BIN])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(report["ours"].as_array().unwrap().len() > 20, "{report}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained(
        dir.path(),
        2,
        &["train.seq_len=32", "model.max_position_embeddings=40"],
    );
    let run = run.to_str().unwrap();
    let hf = dir.path().join("hf");
    let exported = bsfa(&[
        "export",
        "--checkpoint",
        &format!("{run}/checkpoints/step-00000002"),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(exported.status.success());
    let long = "y".repeat(40);
    let missing = dir.path().join("nowhere");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--checkpoint", run, "--prompt", ""],
            "the prompt is empty",
        ),
        (
            &["--checkpoint", run, "--prompt", &long],
            "the prompt is 40 tokens long but the model's context",
        ),
        (
            &["--checkpoint", missing.to_str().unwrap(), "--prompt", "a"],
            "does not exist",
        ),
        (
            &["--checkpoint", empty.to_str().unwrap(), "--prompt", "a"],
            "is neither a checkpoint",
        ),
        (
            &["--checkpoint", hf.to_str().unwrap(), "--prompt", "a"],
            "has no tokenizer.json: pass --tokenizer bytes",
        ),
        (
            &["--checkpoint", run, "--prompt", "a", "--temperature=-1"],
            "--temperature must be a number >= 0",
        ),
        (
            &["--checkpoint", run, "--prompt", "a", "--top-p", "0"],
            "--top-p must be in (0, 1]",
        ),
    ];
    for (args, message) in cases {
        let out = bsfa(&[&["sample"], *args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // The exported folder samples once told its tokenizer.
    ok(bsfa(&[
        "sample",
        "--checkpoint",
        hf.to_str().unwrap(),
        "--tokenizer",
        "bytes",
        "--prompt",
        "a",
        "--max-new-tokens",
        "5",
    ]));
}
