//! Batch mixing (Mixup, CutMix) and label smoothing, producing the soft targets the ViT's
//! loss takes.
//!
//! As in big_vision (Beyer et al. 2022), one mixing ratio is drawn per batch and each image
//! is mixed with its neighbour: sample `i` with sample `i - 1` (the batch rolled by one), so
//! every image is used twice and no partner list is needed. Targets are mixed with the same
//! ratio (for CutMix, the ratio of the pasted area), so each row still sums to 1.

use anyhow::{bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

/// How batches are mixed and labels smoothed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    /// Mixup's Beta(alpha, alpha) parameter; 0 disables Mixup.
    pub mixup_alpha: f64,
    /// CutMix's Beta(alpha, alpha) parameter; 0 disables CutMix.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// With both enabled: probability that a mixed batch uses CutMix rather than Mixup.
    pub switch_prob: f64,
    /// Label smoothing epsilon: targets are `(1 - eps) one_hot + eps / classes`.
    pub label_smoothing: f64,
}

impl MixConfig {
    /// No mixing, no smoothing: one-hot targets.
    pub const NONE: MixConfig = MixConfig {
        mixup_alpha: 0.0,
        cutmix_alpha: 0.0,
        prob: 0.0,
        switch_prob: 0.0,
        label_smoothing: 0.0,
    };

    /// Beyer et al. (2022), the paper's recipe: Mixup with alpha 0.2 on every batch (their
    /// `mixup=dict(p=0.2)` is big_vision's Beta parameter, not a probability), no CutMix,
    /// no label smoothing.
    pub const PAPER: MixConfig = MixConfig {
        mixup_alpha: 0.2,
        cutmix_alpha: 0.0,
        prob: 1.0,
        switch_prob: 0.0,
        label_smoothing: 0.0,
    };

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let alpha_ok = |a: f64| a >= 0.0 && a.is_finite();
        if !alpha_ok(self.mixup_alpha) || !alpha_ok(self.cutmix_alpha) {
            bail!("mixup and cutmix alphas must be finite and >= 0");
        }
        if !unit(self.prob) || !unit(self.switch_prob) || !unit(self.label_smoothing) {
            bail!("mix probability, switch probability and label smoothing must be in [0, 1]");
        }
        Ok(())
    }
}

/// One batch's mixing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    None,
    /// `x_i = lambda x_i + (1 - lambda) x_{i-1}`.
    Mixup {
        lambda: f64,
    },
    /// `x_{i-1}`'s pixels pasted into the box `(x, y, width, height)` of `x_i`; `lambda` is
    /// the fraction of `x_i` left.
    CutMix {
        lambda: f64,
        x: usize,
        y: usize,
        width: usize,
        height: usize,
    },
}

impl Mix {
    /// The weight of each sample's own label in its target.
    pub fn lambda(&self) -> f64 {
        match *self {
            Mix::None => 1.0,
            Mix::Mixup { lambda } | Mix::CutMix { lambda, .. } => lambda,
        }
    }
}

/// Draws a batch's mixing for images of `width x height`.
pub fn draw_mix(config: &MixConfig, width: usize, height: usize, rng: &mut ChaCha8Rng) -> Mix {
    let (mixup, cutmix) = (config.mixup_alpha > 0.0, config.cutmix_alpha > 0.0);
    if !(mixup || cutmix) || !rng.random_bool(config.prob) {
        return Mix::None;
    }
    let use_cutmix = cutmix && (!mixup || rng.random_bool(config.switch_prob));
    let alpha = if use_cutmix {
        config.cutmix_alpha
    } else {
        config.mixup_alpha
    };
    let lambda = Beta::new(alpha, alpha)
        .expect("a positive alpha is a valid Beta parameter")
        .sample(rng);
    if !use_cutmix {
        return Mix::Mixup { lambda };
    }
    // timm's `rand_bbox`: a box of side sqrt(1 - lambda) times the image's around a uniform
    // centre, clipped to the image; lambda becomes the area left.
    let cut = (1.0 - lambda).sqrt();
    let (cut_w, cut_h) = (
        (width as f64 * cut) as usize,
        (height as f64 * cut) as usize,
    );
    let (cx, cy) = (rng.random_range(0..width), rng.random_range(0..height));
    let (x0, x1) = (cx.saturating_sub(cut_w / 2), (cx + cut_w / 2).min(width));
    let (y0, y1) = (cy.saturating_sub(cut_h / 2), (cy + cut_h / 2).min(height));
    let area = ((x1 - x0) * (y1 - y0)) as f64;
    Mix::CutMix {
        lambda: 1.0 - area / (width * height) as f64,
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    }
}

/// Mixes `images` (`batch x channels x height x width`, flat) in place.
pub fn mix_images(
    mix: &Mix,
    images: &mut [f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
) {
    let per_image = channels * height * width;
    debug_assert_eq!(images.len(), batch * per_image);
    if matches!(mix, Mix::None) || batch == 0 {
        return;
    }
    let original = images.to_vec();
    for i in 0..batch {
        let partner = &original[((i + batch - 1) % batch) * per_image..][..per_image];
        let own = &mut images[i * per_image..(i + 1) * per_image];
        match *mix {
            Mix::None => {}
            Mix::Mixup { lambda } => {
                let lambda = lambda as f32;
                for (o, &p) in own.iter_mut().zip(partner) {
                    *o = lambda * *o + (1.0 - lambda) * p;
                }
            }
            Mix::CutMix {
                x,
                y,
                width: w,
                height: h,
                ..
            } => {
                for c in 0..channels {
                    for row in y..y + h {
                        let start = c * height * width + row * width + x;
                        own[start..start + w].copy_from_slice(&partner[start..start + w]);
                    }
                }
            }
        }
    }
}

/// Soft targets (`labels.len() x classes`, flat): smoothed one-hot labels, each mixed with
/// its partner's (sample `i - 1`) by the mix's ratio. Every row sums to 1.
pub fn soft_targets(labels: &[u32], classes: usize, label_smoothing: f64, mix: &Mix) -> Vec<f32> {
    let batch = labels.len();
    let lambda = mix.lambda();
    let floor = label_smoothing / classes as f64;
    let on = 1.0 - label_smoothing;
    let mut targets = vec![floor as f32; batch * classes];
    for (i, &label) in labels.iter().enumerate() {
        let row = &mut targets[i * classes..(i + 1) * classes];
        let partner = labels[(i + batch - 1) % batch] as usize;
        row[label as usize] += (on * lambda) as f32;
        row[partner] += (on * (1.0 - lambda)) as f32;
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rows_sum_to_one(t: &[f32], classes: usize) {
        for row in t.chunks(classes) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row.iter().all(|&v| v >= 0.0));
        }
    }

    #[test]
    fn targets_sum_to_one_and_smooth() {
        let labels = [0u32, 3, 3, 1];
        let plain = soft_targets(&labels, 4, 0.0, &Mix::None);
        assert_eq!(&plain[4..8], &[0.0, 0.0, 0.0, 1.0]);
        let smooth = soft_targets(&labels, 4, 0.1, &Mix::None);
        for (a, b) in smooth[..4].iter().zip([0.925, 0.025, 0.025, 0.025]) {
            assert!((a - b).abs() < 1e-6, "{smooth:?}");
        }
        rows_sum_to_one(&smooth, 4);
        let mixed = soft_targets(&labels, 4, 0.1, &Mix::Mixup { lambda: 0.7 });
        rows_sum_to_one(&mixed, 4);
        // Sample 0's partner is the last sample (label 1).
        assert!((mixed[0] - (0.025 + 0.9 * 0.7)).abs() < 1e-6);
        assert!((mixed[1] - (0.025 + 0.9 * 0.3)).abs() < 1e-6);
        // Same-label partners keep the full weight on that label.
        assert!((mixed[8 + 3] - 0.925).abs() < 1e-6);
    }

    #[test]
    fn mixup_and_cutmix_mix_images_with_their_neighbour() {
        let (b, c, h, w) = (3, 2, 4, 5);
        let images: Vec<f32> = (0..b).flat_map(|i| vec![i as f32; c * h * w]).collect();
        let mut mixed = images.clone();
        mix_images(&Mix::Mixup { lambda: 0.25 }, &mut mixed, b, c, h, w);
        assert_eq!(mixed[0], 0.25 * 0.0 + 0.75 * 2.0);
        assert_eq!(mixed[c * h * w], 0.25 * 1.0 + 0.75 * 0.0);
        let mut cut = images.clone();
        let mix = Mix::CutMix {
            lambda: 0.7,
            x: 1,
            y: 2,
            width: 3,
            height: 2,
        };
        mix_images(&mix, &mut cut, b, c, h, w);
        let second = &cut[c * h * w..2 * c * h * w];
        // Pixels inside the box come from sample 0, the rest stay sample 1's.
        assert_eq!(second[2 * w + 1], 0.0);
        assert_eq!(second[h * w + 3 * w + 3], 0.0);
        assert_eq!(second[2 * w], 1.0);
        assert_eq!(second.iter().filter(|&&v| v == 0.0).count(), 2 * 3 * 2);
        let mut same = images.clone();
        mix_images(&Mix::None, &mut same, b, c, h, w);
        assert_eq!(same, images);
    }

    #[test]
    fn draws_follow_the_config() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        assert_eq!(draw_mix(&MixConfig::NONE, 8, 8, &mut rng), Mix::None);
        let mut lambdas = Vec::new();
        for _ in 0..200 {
            match draw_mix(&MixConfig::PAPER, 8, 8, &mut rng) {
                Mix::Mixup { lambda } => lambdas.push(lambda),
                other => panic!("{other:?}"),
            }
        }
        // Beta(0.2, 0.2) puts most mass near 0 and 1.
        let extreme = lambdas.iter().filter(|l| **l < 0.1 || **l > 0.9).count();
        assert!(extreme > 100, "{extreme}");
        let cutmix = MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
            prob: 1.0,
            ..MixConfig::NONE
        };
        for _ in 0..100 {
            let Mix::CutMix {
                lambda,
                x,
                y,
                width,
                height,
            } = draw_mix(&cutmix, 10, 6, &mut rng)
            else {
                panic!("expected CutMix");
            };
            assert!(x + width <= 10 && y + height <= 6);
            assert!((lambda - (1.0 - (width * height) as f64 / 60.0)).abs() < 1e-12);
        }
        let bad = MixConfig {
            prob: 1.5,
            ..MixConfig::PAPER
        };
        assert!(bad.validate().is_err());
        MixConfig::PAPER.validate().unwrap();
    }
}
