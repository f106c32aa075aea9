//! Helpers shared by the integration tests.

use bsfa_train::config::{ConfigBuilder, RunConfig};

/// A small, fast config on the built-in data, writing into `out`.
pub fn small_config(out: &std::path::Path, sets: &[&str]) -> RunConfig {
    let mut b = ConfigBuilder::new("tiny").unwrap();
    for s in [
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "model.intermediate_size=172",
        "train.batch_size=8",
        "train.seq_len=64",
        "train.eval_batches=2",
        "train.eval_every=0",
        "train.log_every=1",
    ] {
        b.apply_set(s).unwrap();
    }
    for s in sets {
        b.apply_set(s).unwrap();
    }
    b.apply_set(&format!("train.out=\"{}\"", out.display()))
        .unwrap();
    b.build().unwrap()
}
