//! `bsfa-train eval`: the mean next-token loss of a checkpoint's model on a data source,
//! over non-overlapping windows read from the start, llm.c style: window `i` of a segment is
//! `tokens[i*seq .. i*seq + seq + 1]`, its first `seq` ids the inputs and the next `seq` the
//! targets. A shard folder is read shard by shard; a text source is tokenized whole.

use crate::checkpoint::Checkpoint;
use crate::data::{self, DataSpec, TokenSegments, Tokenizer};
use crate::device::Precision;
use crate::model::Llama;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::Path;

/// What `eval` prints as its last stdout line.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Mean loss per target token.
    pub val_loss: f64,
    /// Target tokens evaluated.
    pub tokens: u64,
}

/// How much to evaluate; `None` takes the checkpoint's training values (and, for
/// `batches`, every window).
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub seq_len: Option<usize>,
    pub batch_size: Option<usize>,
    pub batches: Option<usize>,
}

/// Evaluates the model of checkpoint `dir` on `spec` (`shards:PATH`, `text:PATH`, `builtin`).
pub fn run(dir: &Path, spec: &DataSpec, options: &EvalOptions) -> Result<EvalReport> {
    let ck = Checkpoint::open_llama(dir, "eval")?;
    let config = &ck.state.config;
    let seq_len = options.seq_len.unwrap_or(config.train.seq_len);
    let batch = options.batch_size.unwrap_or(config.train.micro_batch());
    if seq_len == 0 || batch == 0 || options.batches == Some(0) {
        bail!("--seq-len, --batch-size and --eval-batches must be at least 1");
    }
    if seq_len > config.model.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} exceeds the model's max_position_embeddings ({})",
            config.model.max_position_embeddings
        );
    }
    let device = Device::Cpu;
    // The ops the run itself evaluated with, so its val losses are reproduced.
    config.train.kernels.apply(&device, Precision::F32)?;
    let (model, params) = Llama::new(&config.model, DType::F32, &device, config.train.seed)?;
    ck.load_model(&params)?;
    // Text sources need the run's tokenizer; shards are already ids.
    let tokenizer = if matches!(spec, DataSpec::Shards(_)) {
        Tokenizer::Bytes
    } else {
        ck.tokenizer()?
    };
    let tokens = TokenSegments::open(spec, &tokenizer, "val", config.model.vocab_size)?;
    if tokens.segment_lens().iter().all(|&n| n <= seq_len) {
        bail!(
            "'{spec}' has no window of seq_len + 1 = {} tokens; lower --seq-len",
            seq_len + 1
        );
    }
    let mut windows = tokens
        .segment_lens()
        .into_iter()
        .enumerate()
        .flat_map(|(segment, n)| {
            (0..n.saturating_sub(1) / seq_len).map(move |i| (segment, i * seq_len))
        })
        .peekable();
    let (mut sum, mut count) = (0.0f64, 0u64);
    let mut batches = 0;
    device.with_context(|| -> Result<()> {
        while windows.peek().is_some() && options.batches.is_none_or(|m| batches < m) {
            let chosen: Vec<(usize, usize)> = windows.by_ref().take(batch).collect();
            let rows = chosen.len();
            // Ids are checked against the vocabulary on the host before they become tensors.
            let (inputs, targets) = data::batch_of(&tokens, &chosen, seq_len, &device)?;
            let loss = model.loss(&inputs, &targets)?.detach();
            let n = (rows * seq_len) as u64;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
            count += n;
            batches += 1;
        }
        Ok(())
    })?;
    Ok(EvalReport {
        val_loss: sum / count as f64,
        tokens: count,
    })
}
