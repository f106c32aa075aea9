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
    /// BSFA's diagnostics per group (`metrics.jsonl`'s `bsfa` lines), empty without BSFA.
    pub subspace: Vec<SubspaceCurves>,
    /// The run's `config.json`, when it has a readable one.
    pub config: Option<crate::config::RunConfig>,
}

/// One parameter group's BSFA diagnostics over a run.
#[derive(Debug, Clone, Default)]
pub struct SubspaceCurves {
    /// `norm`, `attn` or `mlp`.
    pub group: String,
    /// Variance fraction the directions capture, per re-estimation.
    pub energy: Vec<(u64, f64)>,
    /// Overlap of consecutive subspaces, per re-estimation.
    pub overlap: Vec<(u64, f64)>,
}

impl RunCurves {
    /// Reads `DIR/metrics.jsonl`; the label is the optimizer from `DIR/config.json`
    /// (`adamw`, `adam-mini`, `adam-mini+bsfa`, with `4bit` when so), else the folder name
    /// ([`run`] adds what tells runs with the same label apart).
    pub fn load(dir: &Path) -> Result<Self> {
        let metrics = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).with_context(|| {
            format!(
                "cannot read '{}': is '{}' a run folder?",
                metrics.display(),
                dir.display()
            )
        })?;
        let config = config_of(dir);
        let mut run = Self {
            label: label_of(dir, config.as_ref()),
            config,
            train: Vec::new(),
            val: Vec::new(),
            step_ms: Vec::new(),
            subspace: Vec::new(),
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
            for group in record
                .get("bsfa")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                run.add_subspace(step, group);
            }
        }
        if run.val.is_empty() {
            bail!("'{}' has no validation losses", metrics.display());
        }
        Ok(run)
    }

    fn add_subspace(&mut self, step: u64, group: &Value) {
        let Some(name) = group.get("group").and_then(Value::as_str) else {
            return;
        };
        let index = match self.subspace.iter().position(|c| c.group == name) {
            Some(i) => i,
            None => {
                self.subspace.push(SubspaceCurves {
                    group: name.to_string(),
                    ..SubspaceCurves::default()
                });
                self.subspace.len() - 1
            }
        };
        let curves = &mut self.subspace[index];
        if let Some(e) = group.get("energy").and_then(Value::as_f64) {
            curves.energy.push((step, e));
        }
        if let Some(o) = group.get("overlap").and_then(Value::as_f64) {
            curves.overlap.push((step, o));
        }
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

fn config_of(dir: &Path) -> Option<crate::config::RunConfig> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn label_of(dir: &Path, config: Option<&crate::config::RunConfig>) -> String {
    let Some(config) = config else {
        return dir
            .file_name()
            .map_or("run".into(), |n| n.to_string_lossy().into_owned());
    };
    let mut label = crate::checkpoint::optimizer_kind(config);
    if config.bsfa.enabled && config.bsfa.bits == 4 {
        label.push_str(" 4bit");
    }
    label
}

/// Where runs share a label, each gets the settings in which it differs from the others
/// (`adamw lr=0.006 steps=400`), or failing that its folder name.
fn distinguish(runs: &mut [RunCurves], dirs: &[PathBuf]) -> Result<()> {
    let configs: Vec<_> = runs.iter().map(|r| r.config.clone()).collect();
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for (i, run) in runs.iter_mut().enumerate() {
        let twins: Vec<usize> = (0..labels.len())
            .filter(|&j| labels[j] == labels[i])
            .collect();
        if twins.len() < 2 {
            continue;
        }
        // The keys in which any twin differs from this run (where it was written and on how
        // many threads aside), in declaration order.
        let mut keys: Vec<String> = Vec::new();
        if let Some(mine) = &configs[i] {
            for &j in &twins {
                if let Some(other) = &configs[j] {
                    for (key, _, _) in crate::config::differences(mine, other)? {
                        let bookkeeping = ["train.out", "train.threads"].contains(&key.as_str());
                        if !bookkeeping && !keys.contains(&key) {
                            keys.push(key);
                        }
                    }
                }
            }
        }
        let order = crate::config::valid_keys();
        keys.sort_by_key(|k| order.iter().position(|o| o == k));
        let shown: Vec<String> = match &configs[i] {
            Some(config) if !keys.is_empty() => {
                let values = serde_json::to_value(config)?;
                keys.iter()
                    .map(|key| {
                        let value = key.split('.').fold(&values, |v, part| &v[part]);
                        let short = key.rsplit('.').next().unwrap_or(key);
                        format!("{short}={value}")
                    })
                    .collect()
            }
            _ => vec![dirs[i]
                .file_name()
                .map_or("run".into(), |n| n.to_string_lossy().into_owned())],
        };
        run.label = format!("{} {}", labels[i], shown.join(" "));
    }
    Ok(())
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
    let mut runs: Vec<RunCurves> = dirs
        .iter()
        .map(|d| RunCurves::load(d))
        .collect::<Result<_>>()?;
    distinguish(&mut runs, dirs)?;
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
                median_step_ms: crate::metrics::median(&r.step_ms),
            }
        })
        .collect()
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Two panels (train loss, validation loss) against steps, one line per run, and a third
/// with the first BSFA run's subspace diagnostics when a run has them.
fn draw(runs: &[RunCurves], png: &Path, title: &str) -> Result<()> {
    // Registering twice (a second plot in one process) is harmless.
    let _ = plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT);
    let columns = if runs.iter().any(|r| !r.subspace.is_empty()) {
        3
    } else {
        2
    };
    let (width, height) = (700 * columns, 560);
    // Drawn into memory and encoded with `image` (plotters' own encoder would pull in a
    // second, older `image` and `png`).
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw '{}': {e}", png.display());
    draw_into(&mut pixels, (width, height), runs, title).map_err(|e| fail(&e))?;
    image::RgbImage::from_raw(width, height, pixels)
        .context("the drawing does not fill the image")?
        .save(png)
        .map_err(|e| fail(&e))
}

/// The panels of [`draw`], into an RGB buffer of `size`.
fn draw_into(
    pixels: &mut [u8],
    size: (u32, u32),
    runs: &[RunCurves],
    title: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let with_bsfa = runs.iter().find(|r| !r.subspace.is_empty());
    let columns = if with_bsfa.is_some() { 3 } else { 2 };
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT_NAME, 24))?;
    let panels = root.split_evenly((1, columns));
    let colors = COLORS;
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
            .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT_NAME, 14))
            .draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(
                    pick(run).iter().copied(),
                    color.stroke_width(2),
                ))?
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
            .draw()?;
    }
    if let (Some(run), Some(panel)) = (with_bsfa, panels.get(2)) {
        draw_subspace(run, panel)?;
    }
    root.present()?;
    Ok(())
}

/// Per group, the variance fraction the directions capture (solid) and the overlap of
/// consecutive subspaces (dashed), against steps.
fn draw_subspace(
    run: &RunCurves,
    panel: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let max_step = run
        .subspace
        .iter()
        .flat_map(|c| c.energy.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(panel)
        .caption(format!("BSFA subspaces: {}", run.label), (FONT_NAME, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..max_step, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("fraction")
        .label_style((FONT_NAME, 14))
        .draw()?;
    for (i, curves) in run.subspace.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                curves.energy.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(format!("{}: variance captured", curves.group))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(DashedLineSeries::new(
                curves.overlap.iter().copied(),
                6,
                4,
                color.stroke_width(1),
            ))?
            .label(format!("{}: overlap with previous", curves.group))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT_NAME, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
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
            subspace: Vec::new(),
            config: None,
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
