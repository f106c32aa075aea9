//! `bsfa-train plot`: loss curves of finished runs as a PNG, and the comparison table the
//! paper's claim is judged by (final validation loss, the step at which each run first
//! reaches the baseline's final validation loss, median step time).

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The text font, embedded so plots render on machines without fonts (DejaVu Sans,
/// Bitstream Vera license: `src/plot/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const FONT_NAME: &str = "dejavu-sans";

/// One run's logged curves.
#[derive(Debug, Clone)]
pub struct RunCurves {
    pub label: String,
    pub train: Vec<(u64, f64)>,
    pub val: Vec<(u64, f64)>,
    pub step_ms: Vec<f64>,
}

impl RunCurves {
    /// Reads `DIR/metrics.jsonl`; the label is the optimizer from `DIR/config.json`
    /// (`adamw`, `adam-mini`, `adam-mini+bsfa`, with `4bit` when so), else the folder name.
    pub fn load(dir: &Path) -> Result<Self> {
        let metrics = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).with_context(|| {
            format!(
                "cannot read '{}': is '{}' a run folder?",
                metrics.display(),
                dir.display()
            )
        })?;
        let mut run = Self {
            label: label_of(dir),
            train: Vec::new(),
            val: Vec::new(),
            step_ms: Vec::new(),
        };
        for line in text.lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(step) = record.get("step").and_then(Value::as_u64) else {
                continue;
            };
            if let Some(loss) = record.get("loss").and_then(Value::as_f64) {
                run.train.push((step, loss));
            }
            if let Some(loss) = record.get("val_loss").and_then(Value::as_f64) {
                run.val.push((step, loss));
            }
            if let Some(ms) = record.get("step_ms").and_then(Value::as_f64) {
                run.step_ms.push(ms);
            }
        }
        if run.val.is_empty() {
            bail!("'{}' has no validation losses", metrics.display());
        }
        Ok(run)
    }

    /// The last validation loss.
    pub fn final_val(&self) -> f64 {
        self.val.last().map_or(f64::NAN, |v| v.1)
    }

    /// The first evaluated step whose validation loss is at or below `target`.
    pub fn first_reaching(&self, target: f64) -> Option<u64> {
        self.val.iter().find(|(_, l)| *l <= target).map(|(s, _)| *s)
    }
}

fn label_of(dir: &Path) -> String {
    let name = || {
        dir.file_name()
            .map_or("run".into(), |n| n.to_string_lossy().into_owned())
    };
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return name();
    };
    let Ok(config) = serde_json::from_str::<crate::config::RunConfig>(&text) else {
        return name();
    };
    let mut label = crate::checkpoint::optimizer_kind(&config);
    if config.bsfa.enabled && config.bsfa.bits == 4 {
        label.push_str(" 4bit");
    }
    label
}

/// A row of the comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub run: String,
    pub final_val_loss: f64,
    /// First evaluated step at which the run reaches the baseline's final validation loss.
    pub reaches_baseline_at: Option<u64>,
    /// That step over the baseline's last step (the paper claims about 0.5 for BSFA).
    pub steps_ratio: Option<f64>,
    pub median_step_ms: f64,
}

/// Loads `dirs`, draws their curves into `png`, and compares each with the first run.
pub fn run(dirs: &[PathBuf], png: &Path, title: &str) -> Result<Vec<Row>> {
    if dirs.is_empty() {
        bail!("plot needs at least one run folder");
    }
    let runs: Vec<RunCurves> = dirs
        .iter()
        .map(|d| RunCurves::load(d))
        .collect::<Result<_>>()?;
    draw(&runs, png, title)?;
    Ok(compare(&runs))
}

/// The comparison table against `runs[0]`.
pub fn compare(runs: &[RunCurves]) -> Vec<Row> {
    let baseline = &runs[0];
    let target = baseline.final_val();
    let last = baseline.val.last().map_or(0, |v| v.0);
    runs.iter()
        .map(|r| {
            let at = r.first_reaching(target);
            Row {
                run: r.label.clone(),
                final_val_loss: r.final_val(),
                reaches_baseline_at: at,
                steps_ratio: at.map(|s| s as f64 / last as f64),
                median_step_ms: median(&r.step_ms),
            }
        })
        .collect()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Two panels (train loss, validation loss) against steps, one line per run.
fn draw(runs: &[RunCurves], png: &Path, title: &str) -> Result<()> {
    // Registering twice (a second plot in one process) is harmless.
    let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    let root = BitMapBackend::new(png, (1400, 560)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw '{}': {e}", png.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root.titled(title, (FONT_NAME, 24)).map_err(|e| fail(&e))?;
    let panels = root.split_evenly((1, 2));
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    for (panel, (name, pick)) in panels.iter().zip([
        (
            "train loss",
            (|r: &RunCurves| &r.train) as fn(&RunCurves) -> &Vec<(u64, f64)>,
        ),
        ("validation loss", |r: &RunCurves| &r.val),
    ]) {
        let points: Vec<&(u64, f64)> = runs.iter().flat_map(|r| pick(r).iter()).collect();
        let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
        let lo = points.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        // Curves start far above where runs differ: the view stops at the highest loss left
        // after a tenth of the steps, and points above it are left out (not drawn clamped).
        let hi = runs
            .iter()
            .flat_map(|r| pick(r).iter().filter(|p| p.0 * 10 >= max_step))
            .map(|p| p.1)
            .fold(lo, f64::max);
        let pad = (hi - lo).max(1e-3) * 0.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(name, (FONT_NAME, 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT_NAME, 14))
            .draw()
            .map_err(|e| fail(&e))?;
        for (i, run) in runs.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    pick(run).iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?
                .label(run.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT_NAME, 16))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curves(label: &str, val: &[(u64, f64)]) -> RunCurves {
        RunCurves {
            label: label.into(),
            train: val.to_vec(),
            val: val.to_vec(),
            step_ms: vec![3.0, 1.0, 2.0],
        }
    }

    #[test]
    fn table_compares_against_the_first_run() {
        let base = curves("adamw", &[(50, 3.0), (100, 2.0), (150, 1.6), (200, 1.5)]);
        let fast = curves("bsfa", &[(50, 2.5), (100, 1.5), (150, 1.2), (200, 1.1)]);
        let slow = curves("slow", &[(50, 3.5), (100, 3.0), (150, 2.0), (200, 1.9)]);
        let rows = compare(&[base, fast, slow]);
        assert_eq!(rows[0].reaches_baseline_at, Some(200));
        assert_eq!(rows[1].reaches_baseline_at, Some(100));
        assert_eq!(rows[1].steps_ratio, Some(0.5));
        assert_eq!(rows[2].reaches_baseline_at, None);
        assert_eq!(rows[1].median_step_ms, 2.0);

        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("curves.png");
        let runs = [
            curves("a", &[(1, 2.0), (2, 1.0)]),
            curves("b", &[(1, 2.5), (2, 1.5)]),
        ];
        draw(&runs, &png, "test").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
