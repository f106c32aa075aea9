//! The GPU peak-memory prediction of `--dry-run`: extrapolated from 1-2 layers and
//! micro-batches 2-3, it matches the peak measured directly on the whole model at a larger
//! micro-batch. (`tests/dry_run.rs` checks what `--dry-run --gpu-memory` reports.)

use bsfa_train::config::{ConfigBuilder, RunConfig};
use bsfa_train::memory::{measure_one, CountingAlloc, StepPeak};

/// This test binary's heap, counted as the `bsfa-train` binary's is.
#[global_allocator]
static HEAP: CountingAlloc<std::alloc::System> = CountingAlloc::new(std::alloc::System);

fn config(preset: &str, sets: &[&str]) -> RunConfig {
    let mut b = ConfigBuilder::new(preset).unwrap();
    for s in sets {
        b.apply_set(s).unwrap();
    }
    b.build().unwrap()
}

/// Extrapolated to `layers` and `micro_batch`, the prediction is within 2% of the peak
/// measured on the whole model.
fn prediction_matches_direct_measurement(what: &str, c: &RunConfig, layers: usize, micro: usize) {
    let predicted = StepPeak::measure(c, &HEAP).unwrap().bytes(layers, micro);
    let measured = measure_one(c, layers, micro, &HEAP).unwrap() as f64;
    let error = predicted / measured - 1.0;
    eprintln!(
        "{what}: predicted {:.2} MiB, measured {:.2} MiB ({:+.2}%)",
        predicted / 1048576.0,
        measured / 1048576.0,
        100.0 * error
    );
    assert!(error.abs() < 0.02, "{what}: {:+.2}%", 100.0 * error);
}

/// One test, so that the measurements run one after the other: the allocator counts every
/// thread's allocations.
#[test]
fn prediction_matches_the_whole_model() {
    // The test model with grouped-query attention, 6 layers, a vocabulary that is no power of
    // two and longer sequences.
    let llama = [
        "model.num_key_value_heads=2",
        "model.vocab_size=300",
        "train.seq_len=96",
    ];
    for (what, dtype) in [("GQA LLaMA, bf16", "bf16"), ("GQA LLaMA, f32", "f32")] {
        let dtype = format!("train.dtype=\"{dtype}\"");
        let c = config(
            "test",
            &[&llama[..], &["model.num_hidden_layers=6", &dtype]].concat(),
        );
        prediction_matches_direct_measurement(what, &c, 6, 7);
    }
    let vit = config("vit-tiny", &["vit.num_hidden_layers=5"]);
    prediction_matches_direct_measurement("vit-tiny", &vit, 5, 9);
}
