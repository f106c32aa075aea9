//! Run outputs: `metrics.jsonl` for machines, a progress bar on stderr for people.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Appends one JSON object per line and flushes each, so a crash loses nothing written.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Creates (truncating) the log at `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create metrics file '{}'", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes `record` as one line.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write to '{}'", self.path.display()))
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The human view of training on stderr: a live bar on a terminal, plain lines otherwise.
pub struct Progress {
    bar: ProgressBar,
    interactive: bool,
    total: u64,
}

impl Progress {
    /// A progress display for `total` steps.
    pub fn new(total: usize) -> Self {
        let interactive = std::io::stderr().is_terminal();
        let bar = if interactive {
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .expect("static template is valid"),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Self {
            bar,
            interactive,
            total: total as u64,
        }
    }

    /// Records a finished step; on a terminal the bar shows `loss` and `tokens_per_s`,
    /// elsewhere a line is printed when `print` is set.
    pub fn step(&self, step: usize, loss: f64, tokens_per_s: f64, print: bool) {
        self.bar.set_position(step as u64);
        let msg = format!("loss {loss:.4} | {} tok/s", human(tokens_per_s));
        if self.interactive {
            self.bar.set_message(msg);
        } else if print {
            // A hidden bar keeps no rate, so the ETA comes from the mean step time so far.
            let elapsed = self.bar.elapsed().as_secs_f64();
            let eta = elapsed / step.max(1) as f64 * (self.total - step as u64) as f64;
            eprintln!("step {step}/{} {msg} | ETA {eta:.0}s", self.total);
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
