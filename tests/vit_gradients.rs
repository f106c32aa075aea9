//! ViT gradients against central finite differences in f64, op by op (LayerNorm, GELU,
//! attention, soft-target cross-entropy; fused CPU kernels and reference compositions) and
//! for every parameter of a tiny model; plus the ViT-S/16 parameter count.

mod common;

use bsfa_train::model::ops::vit as vit_ops;
use bsfa_train::model::{ParamCounts, ParamGroup, Vit, VitConfig};
use candle_core::{DType, Device, Tensor, Var};
use common::finite_differences::{
    check_all_coordinates, every_parameter_matches, random, scalar, soft_targets, tiny_vit, values,
    weighted_sum,
};
use common::op_cases::assert_close;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = Var::from_tensor(&random(&[2, 3, 8], 2.0, &mut rng)).unwrap();
    let w = Var::from_tensor(&random(&[8], 1.5, &mut rng)).unwrap();
    let b = Var::from_tensor(&random(&[8], 1.0, &mut rng)).unwrap();
    let r = random(&[2, 3, 8], 1.0, &mut rng);
    let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
    let inputs = [x.clone(), w.clone(), b.clone()];
    check_all_coordinates(
        &inputs,
        || weighted_sum(&vit_ops::layer_norm(xt, wt, bt, 1e-6).unwrap(), &r),
        "fused layer_norm",
    );
    check_all_coordinates(
        &inputs,
        || {
            weighted_sum(
                &vit_ops::reference::layer_norm(xt, wt, bt, 1e-6).unwrap(),
                &r,
            )
        },
        "reference layer_norm",
    );
    // Each normalised row (before the affine part) has mean 0 and variance 1.
    let ones = Tensor::ones(8, DType::F64, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(8, DType::F64, &Device::Cpu).unwrap();
    let y = vit_ops::layer_norm(xt, &ones, &zeros, 0.0).unwrap();
    let rows: Vec<Vec<f64>> = y.reshape((6, 8)).unwrap().to_vec2().unwrap();
    for row in rows {
        let mean = row.iter().sum::<f64>() / 8.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
    }
}

#[test]
fn gelu_is_the_erf_form_and_its_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = Var::from_tensor(&random(&[3, 7], 4.0, &mut rng)).unwrap();
    let r = random(&[3, 7], 1.0, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&x),
        || weighted_sum(&vit_ops::gelu(x.as_tensor()).unwrap(), &r),
        "fused gelu",
    );
    check_all_coordinates(
        std::slice::from_ref(&x),
        || weighted_sum(&vit_ops::reference::gelu(x.as_tensor()).unwrap(), &r),
        "reference gelu",
    );
    // 0.5 x (1 + erf(x / sqrt 2)), from Python's math.erf: what torch.nn.GELU() computes.
    let t = Tensor::new(&[1.0f64, -0.5, 3.0, -2.0], &Device::Cpu).unwrap();
    let expected = [
        0.8413447460685429,
        -0.15426876936299344,
        2.99595030590511,
        -0.04550026389635842,
    ];
    for y in [
        vit_ops::gelu(&t).unwrap(),
        vit_ops::reference::gelu(&t).unwrap(),
    ] {
        for (a, b) in values(&y).iter().zip(expected) {
            assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        }
    }
}

#[test]
fn self_attention_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (batch, seq, hidden, heads) = (2, 5, 6, 2);
    let mut var = |shape: &[usize]| Var::from_tensor(&random(shape, 1.0, &mut rng)).unwrap();
    let x = var(&[batch, seq, hidden]);
    let (wq, bq) = (var(&[hidden, hidden]), var(&[hidden]));
    let (wk, bk) = (var(&[hidden, hidden]), var(&[hidden]));
    let (wv, bv) = (var(&[hidden, hidden]), var(&[hidden]));
    let r = random(&[batch, seq, hidden], 1.0, &mut rng);
    // The key bias is left out: its gradient is zero by the maths (see the model test).
    let inputs = [
        x.clone(),
        wq.clone(),
        bq.clone(),
        wk.clone(),
        wv.clone(),
        bv.clone(),
    ];
    let out = || {
        vit_ops::self_attention(
            x.as_tensor(),
            (wq.as_tensor(), bq.as_tensor()),
            (wk.as_tensor(), bk.as_tensor()),
            (wv.as_tensor(), bv.as_tensor()),
            heads,
        )
        .unwrap()
    };
    check_all_coordinates(&inputs, || weighted_sum(&out(), &r), "fused self_attention");
    let reference = || {
        let w = Tensor::cat(&[wq.as_tensor(), wk.as_tensor(), wv.as_tensor()], 0).unwrap();
        let b = Tensor::cat(&[bq.as_tensor(), bk.as_tensor(), bv.as_tensor()], 0).unwrap();
        let qkv = bsfa_train::model::ops::reference::linear(x.as_tensor(), &w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        vit_ops::reference::attention(&qkv, heads).unwrap()
    };
    check_all_coordinates(
        &inputs,
        || weighted_sum(&reference(), &r),
        "reference self_attention",
    );
    // Bidirectional: the first position's output depends on later positions.
    let before = values(&out().narrow(1, 0, 1).unwrap());
    let xt = x.as_tensor().copy().unwrap();
    let last = (xt.narrow(1, seq - 1, 1).unwrap() * 3.0).unwrap();
    let changed = Tensor::cat(&[&xt.narrow(1, 0, seq - 1).unwrap(), &last], 1).unwrap();
    x.set(&changed).unwrap();
    assert_ne!(before, values(&out().narrow(1, 0, 1).unwrap()));
}

/// The fused kernels compute what the reference compositions compute, in f32 too.
#[test]
fn fused_forward_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for dtype in [DType::F32, DType::F64] {
        let t = |shape: &[usize], rng: &mut ChaCha8Rng| {
            random(shape, 3.0, rng).to_dtype(dtype).unwrap()
        };
        let (x, w, b) = (
            t(&[4, 9, 48], &mut rng),
            t(&[48], &mut rng),
            t(&[48], &mut rng),
        );
        let qkv = t(&[3, 11, 3 * 24], &mut rng);
        let lw = t(&[40, 48], &mut rng);
        let pairs = [
            (
                vit_ops::linear(&x, &lw, &b.narrow(0, 0, 40).unwrap()).unwrap(),
                bsfa_train::model::ops::reference::linear(&x, &lw)
                    .unwrap()
                    .broadcast_add(&b.narrow(0, 0, 40).unwrap())
                    .unwrap(),
            ),
            (
                vit_ops::attention(&qkv, 4).unwrap(),
                vit_ops::reference::attention(&qkv, 4).unwrap(),
            ),
            (
                vit_ops::layer_norm(&x, &w, &b, 1e-6).unwrap(),
                vit_ops::reference::layer_norm(&x, &w, &b, 1e-6).unwrap(),
            ),
            (
                vit_ops::gelu(&x).unwrap(),
                vit_ops::reference::gelu(&x).unwrap(),
            ),
        ];
        for (i, (fused, reference)) in pairs.iter().enumerate() {
            let f64_values = |t: &Tensor| values(&t.to_dtype(DType::F64).unwrap());
            let what = format!("{dtype:?}, pair {i}");
            assert_close(&f64_values(fused), &f64_values(reference), 1e-5, &what);
        }
    }
}

#[test]
fn soft_cross_entropy_backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let logits = Var::from_tensor(&random(&[4, 6], 3.0, &mut rng)).unwrap();
    let targets = soft_targets(4, 6, &mut rng);
    check_all_coordinates(
        std::slice::from_ref(&logits),
        || vit_ops::soft_cross_entropy(logits.as_tensor(), &targets).unwrap(),
        "soft_cross_entropy",
    );
    // Against the definition: mean over rows of -sum_c t_c log softmax(z)_c.
    let z: Vec<Vec<f64>> = logits.as_tensor().to_vec2().unwrap();
    let t: Vec<Vec<f64>> = targets.to_vec2().unwrap();
    let expected: f64 = z
        .iter()
        .zip(&t)
        .map(|(z, t)| {
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            -z.iter().zip(t).map(|(z, t)| t * (z - lse)).sum::<f64>()
        })
        .sum::<f64>()
        / 4.0;
    let got = scalar(&vit_ops::soft_cross_entropy(logits.as_tensor(), &targets).unwrap());
    assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    // One-hot targets give the usual cross-entropy of the labels.
    let labels = Tensor::new(&[0u32, 5, 2, 2], &Device::Cpu).unwrap();
    let one_hot = Tensor::new(
        &[
            [1.0f64, 0., 0., 0., 0., 0.],
            [0., 0., 0., 0., 0., 1.],
            [0., 0., 1., 0., 0., 0.],
            [0., 0., 1., 0., 0., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let soft = scalar(&vit_ops::soft_cross_entropy(logits.as_tensor(), &one_hot).unwrap());
    let hard = scalar(
        &bsfa_train::model::ops::reference::cross_entropy(logits.as_tensor(), &labels).unwrap(),
    );
    assert!((soft - hard).abs() < 1e-12);
    let wrong = Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap();
    assert!(vit_ops::soft_cross_entropy(logits.as_tensor(), &wrong).is_err());
}

/// Every parameter (but the key biases, whose gradient is zero by the maths) gets a nonzero
/// gradient whose directional derivative along a random direction, and whose value at
/// sampled coordinates, match finite differences.
#[test]
fn every_vit_parameter_matches_finite_differences() {
    let config = tiny_vit();
    let (model, params) = Vit::new(&config, DType::F64, &Device::Cpu, 5).unwrap();
    // Embeddings (4), 16 tensors per layer, final LayerNorm (2) and classifier (2).
    assert_eq!(params.len(), 4 + 16 * 2 + 2 + 2);
    assert_eq!(
        Some(ParamCounts::of(&params).total),
        config.num_parameters()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let images = random(&[3, 3, 8, 8], 1.0, &mut rng);
    let targets = soft_targets(3, 5, &mut rng);
    let loss = || model.loss(&images, &targets).unwrap();
    let key_bias = "attention.attention.key.bias";
    every_parameter_matches(&params, &loss, key_bias, &mut rng);
    let grads = loss().backward().unwrap();
    for p in params.iter().filter(|p| p.name.ends_with(key_bias)) {
        let g = values(
            grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{} has no gradient", p.name)),
        );
        // The one exception, by the maths: a key bias adds `q . b` to every score of a
        // query's row, and softmax is shift-invariant, so its gradient is exactly zero
        // (timm and Hugging Face train it all the same). Rounding leaves ~1e-17.
        assert!(g.iter().all(|v| v.abs() < 1e-12), "{}: {g:?}", p.name);
        let base = p.var.as_tensor().copy().unwrap();
        p.var.set(&(&base + 0.5).unwrap()).unwrap();
        let shifted = scalar(&loss());
        p.var.set(&base).unwrap();
        assert!((shifted - scalar(&loss())).abs() < 1e-12);
    }
}

/// The patch embedding is the stride-`patch` convolution of Hugging Face's
/// `patch_embeddings.projection`, with its kernel layout (`hidden x channels x p x p`).
#[test]
fn patch_embedding_is_the_convolution() {
    let config = tiny_vit();
    let (model, params) = Vit::new(&config, DType::F64, &Device::Cpu, 7).unwrap();
    let get = |name: &str| {
        params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
    };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let kernel = get("vit.embeddings.patch_embeddings.projection.weight");
    let bias = get("vit.embeddings.patch_embeddings.projection.bias");
    assert_eq!(kernel.var.dims(), [8, 3, 4, 4]);
    bias.var.set(&random(&[8], 1.0, &mut rng)).unwrap();
    let images = random(&[2, 3, 8, 8], 1.0, &mut rng);
    let embedded = model.embeddings(&images).unwrap();
    assert_eq!(embedded.dims(), [2, 5, 8]);
    let conv = images
        .conv2d(kernel.var.as_tensor(), 0, 4, 1, 1)
        .unwrap()
        .broadcast_add(&bias.var.as_tensor().reshape((1, 8, 1, 1)).unwrap())
        .unwrap();
    // `b hidden gy gx` -> `b (gy gx) hidden`, then the class token and positions.
    let conv = conv.flatten_from(2).unwrap().transpose(1, 2).unwrap();
    let cls = get("vit.embeddings.cls_token").var.as_tensor().clone();
    let cls = cls.broadcast_as((2, 1, 8)).unwrap();
    let position = get("vit.embeddings.position_embeddings")
        .var
        .as_tensor()
        .clone();
    let expected = Tensor::cat(&[&cls, &conv], 1)
        .unwrap()
        .broadcast_add(&position)
        .unwrap();
    for (a, b) in values(&embedded).iter().zip(values(&expected)) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    let wrong = random(&[2, 3, 8, 4], 1.0, &mut rng);
    let err = model.logits(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("2 x 3 x 8 x 8") || err.contains("3 x 8 x 8"),
        "{err}"
    );
}

/// ViT-S/16 has 22,050,664 parameters (timm's `vit_small_patch16_224`): patch embedding
/// 384*3*16*16 + 384, class token 384, positions 197*384, per layer 4*(384^2 + 384) +
/// 2*384*1536 + 1536 + 384 + 4*384 over 12 layers, final LayerNorm 2*384, head 384*1000 +
/// 1000. The names follow `ViTForImageClassification`.
#[test]
fn vit_s16_preset_has_the_expected_parameter_count() {
    let config = VitConfig::preset("vit-s16").unwrap();
    let (h, inter, layers) = (384, 1536, 12);
    let per_layer = 4 * (h * h + h) + 2 * h * inter + inter + h + 4 * h;
    let formula = h * 3 * 16 * 16 + h + h + 197 * h + layers * per_layer + 2 * h + h * 1000 + 1000;
    assert_eq!(formula, 22_050_664);
    assert_eq!(config.num_parameters(), Some(formula));
    let (_, params) = Vit::new(&config, DType::F32, &Device::Cpu, 0).unwrap();
    let counts = ParamCounts::of(&params);
    assert_eq!(counts.total, formula);
    assert_eq!(counts.head, h * 1000 + 1000);
    assert_eq!(counts.norms, layers * 4 * h + 2 * h);
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for name in [
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.11.attention.attention.query.weight",
        "vit.encoder.layer.0.attention.attention.key.bias",
        "vit.encoder.layer.0.attention.attention.value.weight",
        "vit.encoder.layer.0.attention.output.dense.weight",
        "vit.encoder.layer.0.intermediate.dense.weight",
        "vit.encoder.layer.0.output.dense.bias",
        "vit.encoder.layer.0.layernorm_before.weight",
        "vit.encoder.layer.0.layernorm_after.bias",
        "vit.layernorm.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(names.contains(&name), "missing {name}");
    }
    let group = |name: &str| params.iter().find(|p| p.name == name).unwrap().group;
    assert_eq!(
        group("vit.encoder.layer.0.output.dense.weight"),
        ParamGroup::Mlp
    );
    assert_eq!(
        group("vit.encoder.layer.0.attention.output.dense.bias"),
        ParamGroup::Attention
    );
    assert_eq!(
        VitConfig::preset("vit-tiny").unwrap().num_parameters(),
        Some(214_218)
    );
    assert!(VitConfig::preset("vit-b16").is_err());
    // The code default of the `vit` section is the shipped vit-tiny preset.
    assert_eq!(VitConfig::default(), VitConfig::preset("vit-tiny").unwrap());
    let mut bad = config.clone();
    bad.patch_size = 15;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("patch_size"));
}
