//! Run outputs: `metrics.jsonl` for machines, a progress bar on stderr for people.

use crate::tensorboard::EventWriter;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Appends one JSON object per line and flushes each, so a crash loses nothing written;
/// optionally mirrors every line into TensorBoard event files.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
    tensorboard: Option<EventWriter>,
}

impl MetricsLog {
    /// Creates (truncating) the log at `path`, and a fresh event file in `tensorboard` when
    /// given.
    pub fn create(path: &Path, tensorboard: Option<&Path>) -> Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create metrics file '{}'", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            tensorboard: tensorboard
                .map(|dir| EventWriter::create(dir, []))
                .transpose()?,
        })
    }

    /// Reopens the log of a resumed run at `path`, dropping the records of steps after
    /// `step` (written after the checkpoint the run resumes from), so that no step appears
    /// twice. The kept lines are rewritten atomically before appending resumes, and the
    /// TensorBoard events (when `tensorboard` is given) are rewritten from them.
    pub fn resume(path: &Path, step: usize, tensorboard: Option<&Path>) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        };
        // A torn last line (a crash mid-write) is not valid JSON: dropped.
        let kept: Vec<(&str, Value)> = text
            .lines()
            .filter_map(|line| Some((line, serde_json::from_str::<Value>(line).ok()?)))
            .filter(|(_, record)| {
                record
                    .get("step")
                    .and_then(Value::as_u64)
                    .is_none_or(|s| s <= step as u64)
            })
            .collect();
        let tensorboard = tensorboard
            .map(|dir| EventWriter::create(dir, kept.iter().map(|(_, record)| record)))
            .transpose()?;
        let kept: String = kept.iter().map(|(line, _)| format!("{line}\n")).collect();
        crate::durable::replace(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            tensorboard,
        })
    }

    /// Writes `record` as one line (and its numbers as TensorBoard scalars).
    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write to '{}'", self.path.display()))?;
        match &mut self.tensorboard {
            Some(events) => events.write(record),
            None => Ok(()),
        }
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
    /// The step this process started at (non-zero after a resume), for the ETA.
    first: u64,
    /// What is counted, in plain lines ("step", "unit").
    unit: &'static str,
    /// Shows nothing (data-parallel ranks other than 0).
    silent: bool,
}

impl Progress {
    /// A progress display for `total` steps, of which `done` are already done (a resume).
    pub fn new(total: usize, done: usize) -> Self {
        Self::counting("step", total, done)
    }

    /// A progress display for `total` of any `unit`, `done` of them already done.
    pub fn counting(unit: &'static str, total: usize, done: usize) -> Self {
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
        bar.set_position(done as u64);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(250));
        Self {
            bar,
            interactive,
            total: total as u64,
            first: done as u64,
            unit,
            silent: false,
        }
    }

    /// A progress display that shows nothing: for ranks other than 0, whose output would
    /// repeat rank 0's.
    pub fn silent() -> Self {
        Self {
            bar: ProgressBar::hidden(),
            interactive: false,
            total: 0,
            first: 0,
            unit: "step",
            silent: true,
        }
    }

    /// Records a finished step; on a terminal the bar shows `loss` and `tokens_per_s`,
    /// elsewhere a line is printed when `print` is set.
    pub fn step(&self, step: usize, loss: f64, tokens_per_s: f64, print: bool) {
        let msg = format!("loss {loss:.4} | {} tok/s", human(tokens_per_s));
        self.update(step, &msg, print);
    }

    /// Moves to `position` with `msg` beside the bar; without a terminal, prints a line with
    /// the ETA when `print` is set.
    pub fn update(&self, position: usize, msg: &str, print: bool) {
        self.bar.set_position(position as u64);
        if self.silent {
            return;
        }
        if self.interactive {
            self.bar.set_message(msg.to_string());
        } else if print {
            // A hidden bar keeps no rate, so the ETA comes from the mean time so far.
            let elapsed = self.bar.elapsed().as_secs_f64();
            let ran = (position as u64).saturating_sub(self.first).max(1);
            let eta = elapsed / ran as f64 * self.total.saturating_sub(position as u64) as f64;
            eprintln!(
                "{} {position}/{} {msg} | ETA {eta:.0}s",
                self.unit, self.total
            );
        }
    }

    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        if self.silent {
            return;
        }
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

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    crate::mfu::memory_mib(&candle_core::Device::Cpu).map(|(_, peak)| peak)
}

/// The median of `xs` (NaN for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(super::median(&[]).is_nan());
    }
}
