//! Trains `vit-tiny` on `synthetic-images` with the image pipeline and AdamW, then reports
//! validation accuracy: the pieces the training loop will wire together, in one file.
//!
//! `cargo run --release --example vit_synthetic -- [STEPS] [BATCH] [--plain] [--lr=F]`
//! (`--plain`: no RandAugment or Mixup, the quickest to learn).

use anyhow::Result;
use bsfa_train::data::images::mix::MixConfig;
use bsfa_train::data::images::pipeline::{ImagePipeline, ImagePosition, PipelineConfig, Transform};
use bsfa_train::data::images::{self};
use bsfa_train::model::accuracy::Accuracy;
use bsfa_train::model::{Vit, VitConfig};
use bsfa_train::optim::schedule::lr_at;
use bsfa_train::optim::OptimizerConfig;
use bsfa_train::optim::{clip_coefficient, Adam, Optimizer};
use candle_core::{DType, Device};
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plain = args.iter().any(|a| a == "--plain");
    let lr: f64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--lr="))
        .map_or(Ok(2e-3), str::parse)?;
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let steps = numbers.first().copied().unwrap_or(600);
    let batch = numbers.get(1).copied().unwrap_or(64);
    let config = VitConfig::preset("vit-tiny")?;
    let device = Device::Cpu;
    let (model, params) = Vit::new(&config, DType::F32, &device, 0)?;
    let (train, val) = images::open_pair(&bsfa_train::data::DataSpec::SyntheticImages)?;

    let mut pipeline_config = PipelineConfig::paper_train(batch, config.image_size, 1);
    if let Transform::Train { augment, mix, .. } = &mut pipeline_config.transform {
        // Small images: crops of at least a third of the image (0.08 of 32x32 is 9x9).
        augment.scale = (0.35, 1.0);
        if plain {
            augment.randaugment = None;
            *mix = MixConfig::NONE;
        }
    }
    let mut pipeline = ImagePipeline::start(train, pipeline_config, ImagePosition::start(0))?;
    let optimizer_config = OptimizerConfig {
        lr,
        weight_decay: 1e-4,
        beta2: 0.999,
        warmup_steps: steps / 10,
        ..OptimizerConfig::default()
    };
    let mut optimizer = Adam::adamw(&optimizer_config, &params)?;
    let started = Instant::now();
    for step in 0..steps {
        let batch = pipeline.next_batch()?.expect("training never ends");
        let loss = model.loss(&batch.images, &batch.soft_targets)?;
        let value = loss.to_scalar::<f32>()?;
        let mut store = loss.backward()?;
        let grads = params
            .iter()
            .map(|p| {
                Ok(store
                    .remove(p.var.as_tensor())
                    .expect("every parameter has a gradient")
                    .detach())
            })
            .collect::<Result<Vec<_>>>()?;
        let (_, clip) = clip_coefficient(&grads, 1.0)?;
        let lr = lr_at(
            step,
            steps,
            optimizer_config.warmup_steps,
            optimizer_config.lr,
            0.05,
        );
        optimizer.step(&params, &grads, lr, clip)?;
        if step % 25 == 0 || step + 1 == steps {
            eprintln!(
                "step {step:4} loss {value:.4} ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let train_s = started.elapsed().as_secs_f64();
    let eval = PipelineConfig::eval(250, config.image_size, 1.0, 1);
    let mut accuracy = Accuracy::default();
    for batch in ImagePipeline::start(val, eval, ImagePosition::start(0))? {
        let batch = batch?;
        accuracy.add(Accuracy::of(&model.logits(&batch.images)?, &batch.labels)?);
    }
    println!(
        "{{\"steps\": {steps}, \"batch\": {batch}, \"plain\": {plain}, \"train_s\": {train_s:.1}, \
         \"val_top1\": {:.4}, \"val_top5\": {:.4}}}",
        accuracy.top1(),
        accuracy.top5()
    );
    Ok(())
}
