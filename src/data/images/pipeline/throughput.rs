//! Timing the pipeline alone, for the benchmark example and the README's figures.

use super::{ImagePipeline, ImagePosition, PipelineConfig};
use crate::data::images::ImageSource;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// What [`measure_throughput`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub images_per_s: f64,
    pub images: usize,
    pub batches: usize,
    pub seconds: f64,
    pub threads: usize,
}

/// Times the pipeline alone: one untimed batch (thread start-up, first reads), then
/// `batches` timed ones, consumed as fast as they come, so the pipeline is the bottleneck.
pub fn measure_throughput(
    source: Arc<dyn ImageSource>,
    config: PipelineConfig,
    seed: u64,
    batches: usize,
) -> Result<Throughput> {
    if batches == 0 {
        bail!("measure at least one batch");
    }
    let threads = config.threads;
    let mut pipeline = ImagePipeline::start(source, config, ImagePosition::start(seed))?;
    pipeline
        .next_batch()?
        .context("the pipeline produced no batch")?;
    let started = Instant::now();
    let mut images = 0;
    let mut timed = 0;
    while timed < batches {
        let Some(batch) = pipeline.next_batch()? else {
            break;
        };
        images += batch.labels.len();
        timed += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Throughput {
        images_per_s: images as f64 / seconds.max(1e-9),
        images,
        batches: timed,
        seconds,
        threads,
    })
}
