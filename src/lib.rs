//! bsfa-train: LLaMA pre-training on Candle, built around the Bulk-Space-Filtration-
//! Accelerator (BSFA).
//!
//! Layout: `bench` (step timing), `config` (typed run config), `cli` (flags), `model` (LLaMA and its
//! differentiable ops), `optim` (optimizers, clipping, schedule), `data` (tokenizers,
//! corpora, batches), `train` (the loop), `metrics` (metrics.jsonl and progress), `checkpoint`
//! (safetensors checkpoints and resume), `interrupt` (Ctrl-C/SIGTERM handling), `eval` and
//! `export` (the subcommands of those names), `plot` (loss curves and the optimizer
//! comparison table).

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
mod cpu;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod interrupt;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod task;
pub mod train;
