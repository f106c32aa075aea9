//! `--profile STEPS`: a Chrome/Perfetto trace of a few training steps in `OUT/trace.json`
//! (open it in `chrome://tracing` or ui.perfetto.dev), written by the `tracing-chrome`
//! layer while rank 0 runs them.
//!
//! Spans: `step` (with its number), inside it `data wait`, `forward`, `backward` (per
//! micro-batch), `all-reduce gradients`, `optimizer` (with `bsfa re-estimation` and `bsfa
//! share projected` inside); `evaluation` and `checkpoint` between steps. The first step of
//! a run is skipped (it pays for allocation and thread start-up); the next STEPS are traced.

use std::path::{Path, PathBuf};
use tracing::subscriber::DefaultGuard;
use tracing_chrome::{ChromeLayerBuilder, FlushGuard};
use tracing_subscriber::layer::SubscriberExt;

/// Traces steps `from..=until` (1-based) of this process's main thread.
pub struct Profiler {
    from: usize,
    until: usize,
    path: PathBuf,
    active: Option<(DefaultGuard, FlushGuard)>,
}

impl Profiler {
    /// A profiler of `steps` steps after the first step this run takes (`start` steps were
    /// done before it), writing `out/trace.json`; None when `steps` is 0.
    pub fn new(steps: usize, start: usize, out: &Path) -> Option<Self> {
        (steps > 0).then(|| Self {
            from: start + 2,
            until: start + 1 + steps,
            path: out.join("trace.json"),
            active: None,
        })
    }

    /// Call before step `step` (1-based) runs: starts tracing at the first profiled step.
    pub fn before(&mut self, step: usize) {
        if step == self.from && self.active.is_none() {
            let (layer, flush) = ChromeLayerBuilder::new()
                .file(&self.path)
                .include_args(true)
                .build();
            let subscriber = tracing_subscriber::registry().with(layer);
            self.active = Some((tracing::subscriber::set_default(subscriber), flush));
        }
    }

    /// Call after step `step` and its evaluation and checkpoint: after the last profiled
    /// step (or when the run stops early, `last`), finishes the trace file.
    pub fn after(&mut self, step: usize, last: bool) {
        if (step >= self.until || last) && self.active.is_some() {
            // The default subscriber first: the flush guard then writes the closing bracket.
            if let Some((default, flush)) = self.active.take() {
                drop(default);
                drop(flush);
            }
            eprintln!(
                "profile of steps {}-{} written to '{}'",
                self.from,
                step.min(self.until),
                self.path.display()
            );
        }
    }
}
