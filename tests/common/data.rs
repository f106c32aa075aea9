//! What the data tests share: llm.c shards read from the format's definition, a word-level
//! tokenizer, and the binary run with only the hub variables a test sets.

use super::command;
use serde_json::Value;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary with `args` and `env`, the hub variables of the test's own environment
/// removed.
pub fn run_hub_free<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    hub_free(args)
        .envs(env.iter().copied())
        .output()
        .expect("binary runs")
}

/// The binary with `args`, without the hub variables of the test's own environment.
pub fn hub_free<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut c = command();
    c.args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT");
    c
}

/// Header and ids of an llm.c shard, from the format's definition alone.
pub fn read_shard(path: &Path) -> ([i32; 3], Vec<u32>) {
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
pub fn split_ids(dir: &Path, meta: &Value, split: &str) -> Vec<u32> {
    meta["splits"][split]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| read_shard(&dir.join(f.as_str().unwrap())).1)
        .collect()
}

/// A word-level tokenizer over `w0 .. w{n-2}` plus `<|endoftext|>` (id n-1).
pub fn word_tokenizer(path: &Path, n: u32) -> tokenizers::Tokenizer {
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

/// The ids `tok` gives `text`.
pub fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}
