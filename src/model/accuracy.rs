//! Top-k classification accuracy of logits against integer labels.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// Correct predictions counted over one or more batches; [`Accuracy::top1`] and
/// [`Accuracy::top5`] turn them into fractions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accuracy {
    pub samples: usize,
    pub top1_correct: usize,
    pub top5_correct: usize,
}

impl Accuracy {
    /// Counts the top-1 and top-5 hits of `logits` (`batch x classes`) against `labels`.
    pub fn of(logits: &Tensor, labels: &[u32]) -> Result<Self> {
        let ranks = label_ranks(logits, labels)?;
        Ok(Self {
            samples: ranks.len(),
            top1_correct: ranks.iter().filter(|&&r| r < 1).count(),
            top5_correct: ranks.iter().filter(|&&r| r < 5).count(),
        })
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, other: Accuracy) {
        self.samples += other.samples;
        self.top1_correct += other.top1_correct;
        self.top5_correct += other.top5_correct;
    }

    /// Fraction of samples whose label has the highest logit (0 when there are none).
    pub fn top1(&self) -> f64 {
        self.top1_correct as f64 / self.samples.max(1) as f64
    }

    /// Fraction of samples whose label is among the five highest logits.
    pub fn top5(&self) -> f64 {
        self.top5_correct as f64 / self.samples.max(1) as f64
    }
}

/// The 0-based rank of each label's logit in its row, highest first. Ties are broken by
/// class index (as a stable descending sort would), so constant logits are not a free hit;
/// a NaN label logit ranks last.
pub fn label_ranks(logits: &Tensor, labels: &[u32]) -> Result<Vec<usize>> {
    let (rows, classes) = logits.dims2()?;
    if rows != labels.len() {
        bail!("{} labels for {rows} rows of logits", labels.len());
    }
    let values: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    values
        .iter()
        .zip(labels)
        .map(|(row, &label)| {
            let label = label as usize;
            if label >= classes {
                bail!("label {label} is not below the number of classes {classes}");
            }
            let z = row[label];
            if z.is_nan() {
                return Ok(classes);
            }
            Ok(row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > z || (v == z && j < label))
                .count())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn counts_top1_and_top5_with_ties_broken_by_index() {
        let logits = Tensor::new(
            &[
                [0.0f32, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0],
                [0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0],
                [0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0],
                [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                [f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let labels = [1, 2, 6, 0, 5, 0];
        assert_eq!(
            label_ranks(&logits, &labels).unwrap(),
            vec![0, 4, 6, 0, 5, 7]
        );
        let acc = Accuracy::of(&logits, &labels).unwrap();
        assert_eq!((acc.samples, acc.top1_correct, acc.top5_correct), (6, 2, 3));
        assert!((acc.top1() - 2.0 / 6.0).abs() < 1e-12);
        let mut total = acc;
        total.add(acc);
        assert_eq!(total.top5_correct, 6);
        assert!(Accuracy::of(&logits, &[0, 1]).is_err());
        let err = Accuracy::of(&logits, &[0, 1, 2, 3, 4, 7]).unwrap_err();
        assert!(err.to_string().contains("label 7"), "{err}");
    }
}
