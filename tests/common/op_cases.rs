//! The model ops beside their reference compositions of candle primitives: one list of
//! cases on random inputs, and the one check that an op's fused kernel computes what its
//! composition computes. The rerouting check (`tests/kernels_switch.rs`) and the checks over
//! several row chunks (`tests/kernels_ops.rs`) run the same cases.

use super::finite_differences::{random, values};
use bsfa_train::model::ops::{self, vit as vit_ops};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Which side of an [`OpCase`] runs: the model op, or its reference composition of candle
/// primitives.
#[derive(Clone, Copy)]
pub enum Side {
    /// The model op (its fused kernel where it has one).
    Op,
    /// The op's reference composition.
    Reference,
}

/// A model op and its reference composition on fixed random inputs: compared are the
/// output and the gradients of `inputs` of the output's sum weighted by `r`.
pub struct OpCase {
    /// The op, as messages name it.
    pub what: String,
    /// The inputs whose gradients are compared.
    pub inputs: Vec<Var>,
    /// The weights of the output's sum whose gradients are compared.
    pub r: Tensor,
    /// Computes the output on either side.
    run: Box<dyn Fn(Side) -> candle_core::Result<Tensor>>,
}

impl OpCase {
    /// A case named `what` comparing the gradients of `inputs`, weighted by `r`.
    pub fn new(
        what: impl Into<String>,
        inputs: &[&Var],
        r: &Tensor,
        run: impl Fn(Side) -> candle_core::Result<Tensor> + 'static,
    ) -> Self {
        OpCase {
            what: what.into(),
            inputs: inputs.iter().map(|&v| v.clone()).collect(),
            r: r.clone(),
            run: Box::new(run),
        }
    }

    /// The op's output.
    pub fn op(&self) -> Tensor {
        (self.run)(Side::Op).unwrap()
    }

    /// The reference composition's output.
    pub fn reference(&self) -> Tensor {
        (self.run)(Side::Reference).unwrap()
    }
}

/// The sizes of [`op_cases`]' inputs: `batch × seq` rows of `hidden` features, in `dtype`.
#[derive(Clone, Copy)]
pub struct Sizes {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Features per position.
    pub hidden: usize,
    /// The ViT attention's heads (a divisor of `hidden`).
    pub vit_heads: usize,
    /// The inputs' dtype.
    pub dtype: DType,
}

/// A variable of random values in `[-scale, scale)`, in `dtype`.
fn var(shape: &[usize], scale: f64, dtype: DType, rng: &mut ChaCha8Rng) -> Var {
    Var::from_tensor(&random_in(shape, scale, dtype, rng)).unwrap()
}

/// Random values in `[-scale, scale)`, in `dtype`.
fn random_in(shape: &[usize], scale: f64, dtype: DType, rng: &mut ChaCha8Rng) -> Tensor {
    random(shape, scale, rng).to_dtype(dtype).unwrap()
}

/// Every model op with its reference composition, on random inputs of the sizes `z`.
pub fn op_cases(z: Sizes, rng: &mut ChaCha8Rng) -> Vec<OpCase> {
    let Sizes {
        batch: b,
        seq: s,
        hidden: h,
        dtype,
        ..
    } = z;
    let x = var(&[b, s, h], 1.5, dtype, rng);
    let mut cases = Vec::new();

    let w = var(&[10, h], 1.0, dtype, rng);
    let r = random_in(&[b, s, 10], 1.0, dtype, rng);
    cases.push(OpCase::new("linear", &[&x, &w], &r, {
        let (x, w) = (x.clone(), w.clone());
        move |side| match side {
            Side::Op => ops::linear(&x, &w),
            Side::Reference => ops::reference::linear(&x, &w),
        }
    }));

    let bias = var(&[10], 1.0, dtype, rng);
    cases.push(OpCase::new("linear with bias", &[&x, &w, &bias], &r, {
        let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
        move |side| match side {
            Side::Op => vit_ops::linear(&x, &w, &bias),
            Side::Reference => vit_ops::reference::linear(&x, &w, &bias),
        }
    }));

    let norm = var(&[h], 1.5, dtype, rng);
    let r = random_in(&[b, s, h], 1.0, dtype, rng);
    cases.push(OpCase::new("rms_norm", &[&x, &norm], &r, {
        let (x, norm) = (x.clone(), norm.clone());
        move |side| match side {
            Side::Op => ops::rms_norm(&x, &norm, 1e-5),
            Side::Reference => ops::reference::rms_norm(&x, &norm, 1e-5),
        }
    }));

    // The residual add with the norm after it, both outputs in the loss: the sum's gradient
    // reaches x before the norm's backward, which adds it in its own pass.
    let delta = var(&[b, s, h], 1.0, dtype, rng);
    cases.push(OpCase::new("add_rms_norm", &[&x, &delta, &norm], &r, {
        let (x, delta, norm) = (x.clone(), delta.clone(), norm.clone());
        move |side| {
            let (sum, normed) = match side {
                Side::Op => ops::add_rms_norm(&x, &delta, &norm, 1e-5)?,
                Side::Reference => {
                    let sum = (x.as_tensor() + delta.as_tensor())?;
                    let normed = ops::reference::rms_norm(&sum, &norm, 1e-5)?;
                    (sum, normed)
                }
            };
            sum + normed
        }
    }));

    let shift = var(&[h], 1.0, dtype, rng);
    cases.push(OpCase::new("layer_norm", &[&x, &norm, &shift], &r, {
        let (x, norm, shift) = (x.clone(), norm.clone(), shift.clone());
        move |side| match side {
            Side::Op => vit_ops::layer_norm(&x, &norm, &shift, 1e-6),
            Side::Reference => vit_ops::reference::layer_norm(&x, &norm, &shift, 1e-6),
        }
    }));

    cases.push(OpCase::new("gelu", &[&x], &r, {
        let x = x.clone();
        move |side| match side {
            Side::Op => vit_ops::gelu(&x),
            Side::Reference => vit_ops::reference::gelu(&x),
        }
    }));

    let (wg, wu) = (
        var(&[12, h], 1.0, dtype, rng),
        var(&[12, h], 1.0, dtype, rng),
    );
    let r = random_in(&[b, s, 12], 1.0, dtype, rng);
    cases.push(OpCase::new("swiglu", &[&x, &wg, &wu], &r, {
        let (x, wg, wu) = (x.clone(), wg.clone(), wu.clone());
        move |side| match side {
            Side::Op => ops::swiglu(&x, &wg, &wu),
            Side::Reference => ops::reference::swiglu(&x, &wg, &wu),
        }
    }));

    cases.push(attention_case(z, rng));

    cases.push(linear_cross_entropy_case(z, rng));
    cases.push(vit_attention_case(z, &x, rng));
    cases
}

/// The output head and the loss over 30 classes, on random inputs of the sizes `z`.
fn linear_cross_entropy_case(z: Sizes, rng: &mut ChaCha8Rng) -> OpCase {
    let (rows, h, dtype) = (z.batch * z.seq, z.hidden, z.dtype);
    let (n, rows) = (rows, var(&[rows, h], 1.5, dtype, rng));
    let head = var(&[30, h], 1.5, dtype, rng);
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..30)).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let one = Tensor::new(1f64, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    OpCase::new("linear_cross_entropy", &[&rows, &head], &one, {
        let (rows, head) = (rows.clone(), head.clone());
        move |side| match side {
            Side::Op => ops::linear_cross_entropy(&rows, &head, &targets),
            Side::Reference => {
                let logits = ops::reference::linear(&rows, &head)?;
                ops::reference::cross_entropy(&logits, &targets)
            }
        }
    })
}

/// The ViT's attention block on `x`: projections with biases over all `batch × seq` rows.
fn vit_attention_case(z: Sizes, x: &Var, rng: &mut ChaCha8Rng) -> OpCase {
    let (h, vit_heads, dtype) = (z.hidden, z.vit_heads, z.dtype);
    let (wq, wk, wv) = (
        var(&[h, h], 1.0, dtype, rng),
        var(&[h, h], 1.0, dtype, rng),
        var(&[h, h], 1.0, dtype, rng),
    );
    let (bq, bv) = (var(&[h], 1.0, dtype, rng), var(&[h], 1.0, dtype, rng));
    // The key bias is no input: its gradient is zero by the maths (see vit_gradients.rs).
    let bk = random_in(&[h], 1.0, dtype, rng);
    let r = random_in(x.dims(), 1.0, dtype, rng);
    OpCase::new("vit self_attention", &[x, &wq, &bq, &wk, &wv, &bv], &r, {
        let (x, wq, wk, wv) = (x.clone(), wq.clone(), wk.clone(), wv.clone());
        let (bq, bv) = (bq.clone(), bv.clone());
        move |side| match side {
            Side::Op => vit_ops::self_attention(&x, (&wq, &bq), (&wk, &bk), (&wv, &bv), vit_heads),
            Side::Reference => {
                let w = Tensor::cat(&[&*wq, &*wk, &*wv], 0)?;
                let b = Tensor::cat(&[&*bq, &bk, &*bv], 0)?;
                let qkv = vit_ops::reference::linear(&x, &w, &b)?;
                vit_ops::reference::attention(&qkv, vit_heads)
            }
        }
    })
}

/// Grouped-query causal attention (4 query heads, 2 key/value heads of 4 dimensions),
/// projections and rotary embeddings included, on random inputs of the sizes `z`.
pub fn attention_case(z: Sizes, rng: &mut ChaCha8Rng) -> OpCase {
    attention_case_with(z, (4, 2), rng)
}

/// [`attention_case`] with `(query heads, key/value heads)` of 4 dimensions each.
pub fn attention_case_with(
    z: Sizes,
    (heads, kv_heads): (usize, usize),
    rng: &mut ChaCha8Rng,
) -> OpCase {
    let Sizes {
        batch: b,
        seq: s,
        hidden: h,
        dtype,
        ..
    } = z;
    let dim = 4;
    let (cos, sin) = ops::rope_tables(dim, s, 10000.0, dtype, &Device::Cpu).unwrap();
    let x = var(&[b, s, h], 1.0, dtype, rng);
    let (wq, wk, wv) = (
        var(&[heads * dim, h], 1.0, dtype, rng),
        var(&[kv_heads * dim, h], 1.0, dtype, rng),
        var(&[kv_heads * dim, h], 1.0, dtype, rng),
    );
    let r = random_in(&[b, s, heads * dim], 1.0, dtype, rng);
    OpCase::new(
        format!("attention over {s} positions"),
        &[&x, &wq, &wk, &wv],
        &r,
        {
            let (x, wq, wk, wv) = (x.clone(), wq.clone(), wk.clone(), wv.clone());
            move |side| match side {
                Side::Op => ops::attention(&x, (&wq, &wk, &wv), (&cos, &sin), heads, kv_heads),
                Side::Reference => {
                    let lin = |w: &Tensor| ops::reference::linear(&x, w);
                    let (q, k, v) = (lin(&wq)?, lin(&wk)?, lin(&wv)?);
                    ops::reference::causal_attention(&q, &k, &v, (&cos, &sin), heads, kv_heads)
                }
            }
        },
    )
}

/// `cases` but the one named `what` (which must be there).
pub fn without(mut cases: Vec<OpCase>, what: &str) -> Vec<OpCase> {
    let before = cases.len();
    cases.retain(|c| c.what != what);
    assert_eq!(cases.len() + 1, before, "no single case {what}");
    cases
}

/// `t`'s values as f64.
pub fn f64_values(t: &Tensor) -> Vec<f64> {
    values(&t.to_dtype(DType::F64).unwrap())
}

/// The output of `f` and the gradients of `inputs` of its sum weighted by `r`.
pub fn output_and_gradients(inputs: &[Var], r: &Tensor, f: &dyn Fn() -> Tensor) -> Vec<Vec<f64>> {
    let out = f();
    let grads = out
        .broadcast_mul(r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut all = vec![f64_values(&out)];
    for v in inputs {
        all.push(f64_values(grads.get(v.as_tensor()).expect("a gradient")));
    }
    all
}

/// Asserts that `a` and `b` hold as many values, each pair within `tol` relative to
/// `1 + |b|`; `what` names them in messages.
pub fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: {x} vs {y}");
    }
}

/// The case's op (fused kernels) and its reference composition agree to f64 rounding,
/// forward and in the gradients of every input.
pub fn fused_matches_reference(case: &OpCase) {
    let OpCase {
        what, inputs, r, ..
    } = case;
    let a = output_and_gradients(inputs, r, &|| case.op());
    let b = output_and_gradients(inputs, r, &|| case.reference());
    for (k, (a, b)) in a.iter().zip(&b).enumerate() {
        let part = if k == 0 {
            "output".into()
        } else {
            format!("gradient {}", k - 1)
        };
        assert_close(a, b, 1e-10, &format!("{what}, {part}"));
    }
}
