//! bsfa-train: LLaMA (and ViT) pre-training on Candle, built around the Bulk-Space-Filtration-
//! Accelerator (BSFA).
//!
//! Components, each owning its typed config section: `model` (LLaMA, ViT, their
//! differentiable ops, and the model spec through which everything outside `task` sees a
//! network), `optim` (AdamW, Adam-mini, the BSFA wrapper, clipping, schedule), `data`
//! (tokenizers, corpora, token shards, image sources and pipelines, where a run's data
//! stands), `dist` (data parallelism), `device` (`--device`, `--dtype`), `checkpoint`
//! (safetensors checkpoints and the resume policy), `metrics` (metrics.jsonl and progress,
//! mirrored into `tensorboard` event files; `mfu` the peak and utilisation figures in them).
//! `config` composes their sections into a run's config, starting from `presets`; `task`
//! pairs a model with its data; `train` is the loop, stopped cleanly by `interrupt`
//! (SIGINT/SIGTERM/SIGHUP). The subcommands: `bench`, `eval`, `export`, `plot`, `sample`, and
//! `dry_run` (`--dry-run`, with `memory`'s measured GPU peak); `memory_check` refuses a
//! config whose estimated memory exceeds the device's before anything is allocated; `cli`
//! maps flags to config keys. Small helpers: `check` (config range checks), `cpu_kernels` (what the fused CPU
//! kernels share, and the switch that turns them off), `durable` (files replaced atomically),
//! `failpoint` (test hooks that crash a process at a chosen point), `lock` (exclusive file
//! locks: a run's out folder, data being prepared), `profile` (`--profile`: a Chrome trace
//! of a few steps).
//!
//! The top-level modules form no import cycle, and only `model` and `task` name an
//! architecture (`tests/layout.rs` checks both).

pub mod bench;
pub mod bench_kernels;
mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
mod cpu_kernels;
pub mod data;
pub mod device;
pub mod dist;
pub mod dry_run;
pub mod durable;
pub mod eval;
pub mod export;
pub mod failpoint;
pub mod interrupt;
pub mod lock;
pub mod memory;
pub mod memory_check;
pub mod metrics;
pub mod mfu;
pub mod model;
pub mod optim;
pub mod plot;
mod presets;
pub mod profile;
pub mod sample;
pub mod task;
pub mod tensorboard;
pub mod train;
