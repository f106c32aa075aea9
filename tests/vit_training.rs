//! `vit-tiny` learns `synthetic-images` through the image pipeline: the model, its loss,
//! the pipeline and the accuracy helper working together with the crate's AdamW.

use bsfa_train::data::images;
use bsfa_train::data::images::mix::MixConfig;
use bsfa_train::data::images::pipeline::{ImagePipeline, ImagePosition, PipelineConfig, Transform};
use bsfa_train::model::accuracy::Accuracy;
use bsfa_train::model::{Vit, VitConfig};
use bsfa_train::optim::schedule::lr_at;
use bsfa_train::optim::OptimizerConfig;
use bsfa_train::optim::{Adam, Optimizer};
use candle_core::{DType, Device};

#[test]
fn vit_tiny_learns_synthetic_images() {
    let config = VitConfig::preset("vit-tiny").unwrap();
    let (model, params) = Vit::new(&config, DType::F32, &Device::Cpu, 0).unwrap();
    let (train, val) = images::open_pair(&bsfa_train::data::DataSpec::SyntheticImages).unwrap();
    let mut pipeline_config = PipelineConfig::paper_train(32, 32, 2);
    if let Transform::Train { augment, mix, .. } = &mut pipeline_config.transform {
        augment.scale = (0.35, 1.0);
        augment.randaugment = None;
        *mix = MixConfig::NONE;
    }
    let mut pipeline =
        ImagePipeline::start(train, pipeline_config, ImagePosition::start(0)).unwrap();
    let optimizer_config = OptimizerConfig {
        lr: 1e-3,
        weight_decay: 1e-4,
        beta2: 0.999,
        ..OptimizerConfig::default()
    };
    let mut optimizer = Adam::adamw(&optimizer_config, &params).unwrap();
    let steps = 200;
    let mut losses = Vec::new();
    for step in 0..steps {
        let batch = pipeline.next_batch().unwrap().unwrap();
        let loss = model.loss(&batch.images, &batch.soft_targets).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let mut store = loss.backward().unwrap();
        let grads: Vec<_> = params
            .iter()
            .map(|p| store.remove(p.var.as_tensor()).unwrap().detach())
            .collect();
        let lr = lr_at(step, steps, 20, optimizer_config.lr, 0.05);
        optimizer.step(&params, &grads, lr, 1.0).unwrap();
    }
    // Ten balanced classes: chance is ln(10) = 2.30 nats and 10% accuracy.
    assert!(
        (losses[0] - 10f32.ln()).abs() < 0.15,
        "first loss {}",
        losses[0]
    );
    let last: f32 = losses[steps - 20..].iter().sum::<f32>() / 20.0;
    assert!(last < 2.1, "loss {} -> {last}", losses[0]);
    let mut accuracy = Accuracy::default();
    for batch in ImagePipeline::start(
        val,
        PipelineConfig::eval(250, 32, 1.0, 2),
        ImagePosition::start(0),
    )
    .unwrap()
    {
        let batch = batch.unwrap();
        accuracy.add(Accuracy::of(&model.logits(&batch.images).unwrap(), &batch.labels).unwrap());
    }
    eprintln!(
        "vit-tiny, {steps} steps: loss {} -> {last}, val top-1 {}, top-5 {}",
        losses[0],
        accuracy.top1(),
        accuracy.top5()
    );
    assert_eq!(accuracy.samples, 1000);
    assert!(accuracy.top1() > 0.25, "val top-1 {}", accuracy.top1());
    assert!(accuracy.top5() > accuracy.top1());
}
