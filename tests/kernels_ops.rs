//! The reference compositions' backward against finite differences in f64, and every op
//! with a weight gradient fused against its reference on more rows than one of the fused
//! kernels' 64-row chunks (the shared [`fused_matches_reference`] check).

mod common;

use bsfa_train::model::ops::{self, vit as vit_ops};
use candle_core::{DType, Device, Tensor, Var};
use common::finite_differences::{check_all_coordinates, random, soft_targets, weighted_sum};
use common::op_cases::{attention_case, fused_matches_reference, op_cases, without, Sizes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A variable of random f64 values in `[-scale, scale)`.
fn var64(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Var {
    Var::from_tensor(&random(shape, scale, rng)).unwrap()
}

#[test]
fn llama_reference_ops_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let rng = &mut rng;
    let (b, s, h) = (2, 4, 6);
    let x = var64(&[b, s, h], 1.5, rng);
    let xt = x.as_tensor();

    let w = var64(&[5, h], 1.0, rng);
    let r = random(&[b, s, 5], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), w.clone()],
        || weighted_sum(&ops::reference::linear(xt, w.as_tensor()).unwrap(), &r),
        "reference linear",
    );

    let norm = var64(&[h], 1.5, rng);
    let r = random(&[b, s, h], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), norm.clone()],
        || {
            weighted_sum(
                &ops::reference::rms_norm(xt, norm.as_tensor(), 1e-5).unwrap(),
                &r,
            )
        },
        "reference rms_norm",
    );

    let (wg, wu) = (var64(&[7, h], 1.0, rng), var64(&[7, h], 1.0, rng));
    let r = random(&[b, s, 7], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), wg.clone(), wu.clone()],
        || {
            let y = ops::reference::swiglu(xt, wg.as_tensor(), wu.as_tensor()).unwrap();
            weighted_sum(&y, &r)
        },
        "reference swiglu",
    );

    // Grouped-query attention, projections and rotary embeddings included.
    let (heads, kv_heads, dim) = (4, 2, 4);
    let (cos, sin) = ops::rope_tables(dim, s, 10000.0, DType::F64, &Device::Cpu).unwrap();
    let (wq, wk, wv) = (
        var64(&[heads * dim, h], 1.0, rng),
        var64(&[kv_heads * dim, h], 1.0, rng),
        var64(&[kv_heads * dim, h], 1.0, rng),
    );
    let r = random(&[b, s, heads * dim], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), wq.clone(), wk.clone(), wv.clone()],
        || {
            let lin = |w: &Var| ops::reference::linear(xt, w.as_tensor()).unwrap();
            let y = ops::reference::causal_attention(
                &lin(&wq),
                &lin(&wk),
                &lin(&wv),
                (&cos, &sin),
                heads,
                kv_heads,
            )
            .unwrap();
            weighted_sum(&y, &r)
        },
        "reference attention",
    );

    // The output head and the token cross-entropy, as `linear_cross_entropy` composes them
    // off the fused path.
    let rows = var64(&[b * s, h], 1.5, rng);
    let head = var64(&[9, h], 1.5, rng);
    let targets: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..9)).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    check_all_coordinates(
        &[rows.clone(), head.clone()],
        || {
            let logits = ops::reference::linear(rows.as_tensor(), head.as_tensor()).unwrap();
            ops::reference::cross_entropy(&logits, &targets).unwrap()
        },
        "reference linear cross-entropy",
    );
}

#[test]
fn vit_reference_ops_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let rng = &mut rng;
    let (b, s, h, heads) = (2, 4, 6, 2);
    let x = var64(&[b, s, h], 1.5, rng);
    let xt = x.as_tensor();

    let (w, bias) = (var64(&[5, h], 1.0, rng), var64(&[5], 1.0, rng));
    let r = random(&[b, s, 5], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), w.clone(), bias.clone()],
        || {
            let y = vit_ops::reference::linear(xt, w.as_tensor(), bias.as_tensor()).unwrap();
            weighted_sum(&y, &r)
        },
        "reference linear with bias",
    );

    let (ln_w, ln_b) = (var64(&[h], 1.5, rng), var64(&[h], 1.0, rng));
    let r = random(&[b, s, h], 1.0, rng);
    check_all_coordinates(
        &[x.clone(), ln_w.clone(), ln_b.clone()],
        || {
            let y = vit_ops::reference::layer_norm(xt, ln_w.as_tensor(), ln_b.as_tensor(), 1e-6);
            weighted_sum(&y.unwrap(), &r)
        },
        "reference layer_norm",
    );

    check_all_coordinates(
        std::slice::from_ref(&x),
        || weighted_sum(&vit_ops::reference::gelu(xt).unwrap(), &r),
        "reference gelu",
    );

    let qkv = var64(&[b, s, 3 * h], 1.0, rng);
    check_all_coordinates(
        std::slice::from_ref(&qkv),
        || {
            weighted_sum(
                &vit_ops::reference::attention(qkv.as_tensor(), heads).unwrap(),
                &r,
            )
        },
        "reference bidirectional attention",
    );

    // The soft-target cross-entropy has no fused kernel: it is its own reference.
    let logits = var64(&[4, 6], 3.0, rng);
    let soft = soft_targets(4, 6, rng);
    check_all_coordinates(
        std::slice::from_ref(&logits),
        || vit_ops::soft_cross_entropy(logits.as_tensor(), &soft).unwrap(),
        "soft cross-entropy",
    );
}

// ---------------------------------------------------------------------------------------
// Fused against reference on more rows than one 64-row chunk.

/// Rows of the inputs below: two whole 64-row chunks of the fused reductions and a partial
/// third.
const BATCH: usize = 3;
const SEQ: usize = 61;

#[test]
fn fused_gradients_over_several_row_chunks_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let sizes = Sizes {
        batch: BATCH,
        seq: SEQ,
        hidden: 16,
        vit_heads: 4,
        dtype: DType::F64,
    };
    // gelu is elementwise: no weight gradient, no row chunks.
    let mut cases = without(op_cases(sizes, &mut rng), "gelu");
    // Grouped-query causal attention over 130 positions as well as 61: its query rows are
    // chunked too.
    let longer = Sizes {
        batch: 2,
        seq: 130,
        ..sizes
    };
    cases.push(attention_case(longer, &mut rng));
    for case in &cases {
        fused_matches_reference(case);
    }
}
