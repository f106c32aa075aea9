//! Token sources and batch sampling.

pub mod builtin;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use tokenizer::Tokenizer;

/// Training and validation token streams.
pub struct TokenData {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// Reads and tokenizes the train (and optional validation) source; without a validation
/// source the last `val_fraction` of the training tokens is held out.
pub fn load(
    train_spec: &str,
    val_spec: Option<&str>,
    val_fraction: f64,
    tokenizer: &Tokenizer,
    seq_len: usize,
) -> Result<TokenData> {
    let mut train = read_tokens(train_spec, tokenizer)?;
    let val = match val_spec {
        Some(spec) => read_tokens(spec, tokenizer)?,
        None => {
            let held_out = ((train.len() as f64) * val_fraction) as usize;
            train.split_off(train.len() - held_out)
        }
    };
    for (what, tokens, spec) in [
        ("training", &train, train_spec),
        ("validation", &val, val_spec.unwrap_or(train_spec)),
    ] {
        if tokens.len() <= seq_len {
            bail!(
                "the {what} data from '{spec}' has {} tokens, fewer than one sequence of \
                 seq_len + 1 = {}; provide more text or lower --seq-len",
                tokens.len(),
                seq_len + 1
            );
        }
    }
    Ok(TokenData { train, val })
}

fn read_tokens(spec: &str, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let text = if spec == "builtin" {
        builtin::corpus()
    } else if let Some(path) = spec.strip_prefix("text:") {
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read data file '{path}' (check the path given to --data text:PATH)")
        })?;
        String::from_utf8(bytes)
            .with_context(|| format!("data file '{path}' is not valid UTF-8 text"))?
    } else {
        bail!("unknown data source '{spec}'; use 'builtin' or 'text:PATH'");
    };
    if text.trim().is_empty() {
        bail!("data source '{spec}' is empty");
    }
    tokenizer.encode(&text)
}

/// Draws random windows of `seq_len + 1` tokens from a stream, deterministically from a seed.
pub struct Batcher<'a> {
    tokens: &'a [u32],
    rng: ChaCha8Rng,
}

impl<'a> Batcher<'a> {
    /// A sampler over `tokens`, which must hold more than one window.
    pub fn new(tokens: &'a [u32], seed: u64) -> Self {
        Self {
            tokens,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Inputs and next-token targets, each `batch x seq_len` (u32).
    pub fn next_batch(
        &mut self,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let last_start = self.tokens.len() - seq_len - 1;
        let mut inputs = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let start = self.rng.random_range(0..=last_start);
            inputs.extend_from_slice(&self.tokens[start..start + seq_len]);
            targets.extend_from_slice(&self.tokens[start + 1..start + seq_len + 1]);
        }
        Ok((
            Tensor::from_vec(inputs, (batch, seq_len), device)?,
            Tensor::from_vec(targets, (batch, seq_len), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut b = Batcher::new(&tokens, 7);
        let (x, y) = b.next_batch(3, 10, &Device::Cpu).unwrap();
        let x: Vec<Vec<u32>> = x.to_vec2().unwrap();
        let y: Vec<Vec<u32>> = y.to_vec2().unwrap();
        for (xr, yr) in x.iter().zip(&y) {
            for t in 0..10 {
                assert_eq!(yr[t], xr[t] + 1);
            }
        }
        let mut again = Batcher::new(&tokens, 7);
        let (x2, _) = again.next_batch(3, 10, &Device::Cpu).unwrap();
        assert_eq!(x, x2.to_vec2::<u32>().unwrap());
    }

    #[test]
    fn held_out_tail_and_short_data() {
        let data = load("builtin", None, 0.1, &Tokenizer::Bytes, 64).unwrap();
        let total = data.train.len() + data.val.len();
        assert!(data.val.len().abs_diff(total / 10) <= 1);
        let err = load("builtin", None, 0.1, &Tokenizer::Bytes, 5_000_000)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fewer than one sequence"), "{err}");
    }
}
