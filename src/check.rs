//! Range checks shared by the config sections' `validate` methods.

/// True for a finite number above zero (false for NaN).
pub fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// True for a finite number at or above zero (false for NaN).
pub fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}
