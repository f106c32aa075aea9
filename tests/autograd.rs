//! The autograd patch of candle-core (`vendor/candle-core/src/backprop.rs`,
//! `GradStore::accumulate`; `[patch.crates-io]` in Cargo.toml): an operand that no variable
//! leads to gets no gradient, and a first gradient is stored as it is instead of being
//! zero-filled and added, with the same values.

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// `y = sum(x * c + exp(x) - x * mask)` with `c` and a broadcast `mask` constants: only the
/// variable gets a gradient (candle 0.11.1 unpatched stores zero-filled ones for `c`, the
/// mask and the broadcast mask too, kept to the end of the backward).
#[test]
fn operands_that_need_no_gradient_get_none() -> Result<()> {
    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(
        &[[0.5f64, -1.0, 2.0], [0.25, 3.0, -0.5]],
        &device,
    )?)?;
    let c = Tensor::new(&[[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0]], &device)?;
    let mask = Tensor::new(&[1.0f64, 0.0, 1.0], &device)?;
    let y = ((x.as_tensor() * &c)? + x.exp()? - x.broadcast_mul(&mask)?)?.sum_all()?;
    let grads = y.backward()?;
    assert!(grads.get(&c).is_none(), "the constant got a gradient");
    assert!(grads.get(&mask).is_none(), "the mask got a gradient");
    assert_eq!(
        grads.get_ids().count(),
        1,
        "only the variable's gradient stays"
    );
    // d/dx = c + exp(x) - mask, exactly as the math says (to rounding).
    let want = ((&c + x.exp()?)?.broadcast_sub(&mask))?;
    let got = grads.get(&x).expect("the variable's gradient");
    let err = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(err < 1e-15, "gradient off by {err}");
    Ok(())
}

/// A first gradient that is a strided view (a transpose's) is stored contiguous, and later
/// contributions add to it: `y = sum(w^T * a) + sum(w * b)` gives `a^T + b`.
#[test]
fn strided_first_gradients_are_stored_contiguous_and_summed() -> Result<()> {
    let device = Device::Cpu;
    let w = Var::from_tensor(&Tensor::arange(0f32, 6.0, &device)?.reshape((2, 3))?)?;
    let a = Tensor::arange(10f32, 16.0, &device)?.reshape((3, 2))?;
    let b = Tensor::ones((2, 3), DType::F32, &device)?;
    let y = ((w.t()? * &a)?.sum_all()? + (w.as_tensor() * &b)?.sum_all()?)?;
    let grads = y.backward()?;
    let got = grads.get(&w).expect("the gradient");
    assert!(got.is_contiguous());
    let want = (a.t()? + &b)?;
    assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
    // The softmax's detached row maximum gets no gradient either.
    let s = w.as_tensor().max_keepdim(D::Minus1)?.detach();
    let z = w.broadcast_sub(&s)?.exp()?.sum_all()?;
    let grads = z.backward()?;
    assert!(grads.get(&s).is_none());
    Ok(())
}
