//! Linear warmup, then cosine decay to a floor (the paper's and nanoGPT's schedule).

/// Learning rate for 0-based optimizer `step` of a `total`-step run: rises linearly to
/// `peak` over `warmup` steps (reaching it at step `warmup - 1`), then follows a cosine
/// from `peak` at step `warmup` down to `peak * min_ratio` at the last step.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let floor = peak * min_ratio;
    let decay_steps = total.saturating_sub(warmup + 1);
    if decay_steps == 0 {
        return peak;
    }
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    floor + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (peak - floor)
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_peak_and_floor() {
        let (total, warmup, peak, ratio) = (100, 10, 1e-3, 0.05);
        assert!((lr_at(0, total, warmup, peak, ratio) - 1e-4).abs() < 1e-15);
        assert!((lr_at(4, total, warmup, peak, ratio) - 5e-4).abs() < 1e-15);
        assert_eq!(lr_at(9, total, warmup, peak, ratio), peak);
        assert_eq!(lr_at(10, total, warmup, peak, ratio), peak);
        // Halfway through the decay the cosine sits midway between peak and floor.
        let mid = lr_at(10 + 89 / 2, total, warmup, peak, ratio);
        assert!(mid < peak && mid > peak * ratio);
        assert!((lr_at(99, total, warmup, peak, ratio) - 5e-5).abs() < 1e-15);
        // Monotone decay after warmup.
        let lrs: Vec<f64> = (10..100)
            .map(|s| lr_at(s, total, warmup, peak, ratio))
            .collect();
        assert!(lrs.windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn no_warmup() {
        assert_eq!(lr_at(0, 10, 0, 1.0, 0.1), 1.0);
        assert!((lr_at(9, 10, 0, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }
}
