//! The autograd patch of candle-core (`vendor/candle-core/src/backprop.rs`,
//! `GradStore::accumulate`; `[patch.crates-io]` in Cargo.toml): an operand that no variable
//! leads to gets no gradient, and a first gradient is stored as it is instead of being
//! zero-filled and added, with the same values; and a custom op may add its first operand's
//! gradient into the stored one itself (`CustomOp2::bwd_accumulating`).

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

/// `2 * x` as a custom op whose backward adds into the gradient already stored for `x` itself
/// (`CustomOp2::bwd_accumulating`), and says so by adding 1000 more than the math: the store
/// keeps what the op returned when `x` has a gradient, and takes the plain `bwd` when not.
struct Doubling;

impl candle_core::CustomOp2 for Doubling {
    fn name(&self) -> &'static str {
        "doubling"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F64(v) = s else {
            candle_core::bail!("f64 only");
        };
        let doubled = v.iter().map(|x| 2.0 * x).collect();
        Ok((candle_core::CpuStorage::F64(doubled), l.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((grad * 2.0)?), None))
    }

    fn bwd_accumulating(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
        existing: &Tensor,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(Some((((existing + (grad * 2.0)?)? + 1000.0)?, None)))
    }
}

/// The hook RMSNorm's backward uses to add the residual stream's gradient in its own pass.
#[test]
fn a_custom_op_may_add_into_the_stored_gradient_itself() -> Result<()> {
    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &device)?)?;
    let unused = Tensor::zeros(2, DType::F64, &device)?;
    // x feeds the sum directly and through the op: the sum's gradient reaches x first (the
    // op's output is an operand of the same add), so the op finds it stored.
    let y = (x.as_tensor() + x.apply_op2(&unused, Doubling)?)?.sum_all()?;
    let got = y
        .backward()?
        .get(&x)
        .expect("x's gradient")
        .to_vec1::<f64>()?;
    assert_eq!(got, vec![1003.0, 1003.0], "the op's own sum was not kept");
    // Alone, the op finds no gradient stored and its plain backward runs.
    let y = x.apply_op2(&unused, Doubling)?.sum_all()?;
    let got = y
        .backward()?
        .get(&x)
        .expect("x's gradient")
        .to_vec1::<f64>()?;
    assert_eq!(got, vec![2.0, 2.0]);
    Ok(())
}
