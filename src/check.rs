//! Range checks shared by the config sections' `validate` methods, and the checked
//! arithmetic that sizes a model from them (any size a config can hold must not wrap).

/// True for a finite number above zero (false for NaN).
pub fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

/// True for a finite number at or above zero (false for NaN).
pub fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

/// The sum of the products of each term's factors, or `None` when it overflows `usize`:
/// sizes from a config (a vocabulary of 10^11 times a width of 4 * 10^9) can.
pub fn sum_of_products(terms: &[&[usize]]) -> Option<usize> {
    terms.iter().try_fold(0usize, |sum, factors| {
        let product = factors.iter().try_fold(1usize, |p, &f| p.checked_mul(f))?;
        sum.checked_add(product)
    })
}
