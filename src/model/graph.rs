//! The backprop graph candle records behind a loss, node by node, and the gradient store its
//! backward leaves: what the GPU performance model (`scripts/perf_model/`) replays on paper,
//! so that a test can hold the model to the code (`tests/perf_model.rs`).
//!
//! candle-core keeps each node's op private, but its walk (`Tensor::sorted_nodes`, the order
//! `Tensor::backward` visits) and each node's shape, type, layout and storage are public: a
//! node that shares its storage with a node it depends on is a view (reshape, transpose,
//! narrow, broadcast), any other one ran a kernel.

use super::Param;
use candle_core::backprop::GradStore;
use candle_core::{Storage, Tensor};
use serde::Serialize;
use std::collections::HashMap;

/// Where a node's elements come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A variable: a leaf the backward stops at.
    Var,
    /// A view of an earlier node's storage: no kernel, no memory.
    View,
    /// A storage of its own, written by a kernel.
    Fresh,
}

/// How a node's elements lie in its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Row-major and dense.
    Contiguous,
    /// A dimension repeats its elements (stride 0): a broadcast.
    Broadcast,
    /// Any other stride pattern (a transpose, a narrow).
    Strided,
}

/// One node of the graph, in the order the backward visits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphNode {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type, as candle names it (`bf16`, `f32`).
    pub dtype: &'static str,
    /// Variable, view or fresh storage.
    pub origin: Origin,
    /// Contiguous, broadcast or strided.
    pub placement: Placement,
}

/// The nodes the backward of `root` visits, root first (candle's `sorted_nodes`): those
/// that depend on a variable, variables included.
pub fn graph_nodes(root: &Tensor) -> Vec<GraphNode> {
    let nodes = root.sorted_nodes();
    // A producer comes after all its consumers, so of the nodes sharing a storage the last
    // one made it and the others are views of it.
    let keys: Vec<usize> = nodes.iter().map(|t| storage_key(t)).collect();
    let owner: HashMap<usize, usize> = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
    nodes
        .iter()
        .zip(&keys)
        .enumerate()
        .map(|(i, (t, key))| GraphNode {
            shape: t.dims().to_vec(),
            dtype: t.dtype().as_str(),
            origin: if t.is_variable() {
                Origin::Var
            } else if owner[key] != i {
                Origin::View
            } else {
                Origin::Fresh
            },
            placement: placement(t),
        })
        .collect()
}

/// One gradient left in the store after the backward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredGradient {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: &'static str,
    /// A parameter's gradient; otherwise one of an operand that needs none (a mask, a
    /// detached maximum, a rotary table), which candle computes and keeps all the same.
    pub param: bool,
}

/// Every gradient `store` holds, parameters' first (in `params` order), then the others
/// sorted by shape and type.
pub fn stored_gradients(store: &GradStore, params: &[Param]) -> Vec<StoredGradient> {
    let entry = |g: &Tensor, param| StoredGradient {
        shape: g.dims().to_vec(),
        dtype: g.dtype().as_str(),
        param,
    };
    let ids: Vec<_> = params.iter().map(|p| p.var.as_tensor().id()).collect();
    let mut out: Vec<StoredGradient> = ids
        .iter()
        .filter_map(|&id| store.get_id(id).map(|g| entry(g, true)))
        .collect();
    let mut others: Vec<StoredGradient> = store
        .get_ids()
        .filter(|id| !ids.contains(id))
        .filter_map(|&id| store.get_id(id).map(|g| entry(g, false)))
        .collect();
    others.sort_by(|a, b| (&a.shape, a.dtype).cmp(&(&b.shape, b.dtype)));
    out.extend(others);
    out
}

/// Identifies the allocation behind `t`: equal for tensors that share it.
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

fn placement(t: &Tensor) -> Placement {
    if t.is_contiguous() {
        Placement::Contiguous
    } else if t
        .dims()
        .iter()
        .zip(t.stride())
        .any(|(&d, &s)| d > 1 && s == 0)
    {
        Placement::Broadcast
    } else {
        Placement::Strided
    }
}

#[cfg(test)]
mod tests {
    use super::super::ParamGroup;
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Variables, views (a transpose, a broadcast, a reshape) and kernels come out in the
    /// backward's order, each with its origin and placement; the broadcast operand that needs
    /// no gradient gets none (our autograd patch: candle 0.11.1 as released stored one), so the
    /// store holds the variables' alone.
    #[test]
    fn nodes_and_gradients_of_a_small_graph() -> candle_core::Result<()> {
        let cpu = &Device::Cpu;
        let w = Var::ones((2, 3), DType::F32, cpu)?;
        let scale = Var::ones(3, DType::F32, cpu)?;
        let bias = Tensor::ones(3, DType::F32, cpu)?;
        let y = w
            .t()?
            .matmul(&w)?
            .broadcast_add(&bias)?
            .broadcast_mul(&scale)?
            .sum_all()?;
        let node = |shape: &[usize], origin, placement| GraphNode {
            shape: shape.to_vec(),
            dtype: "f32",
            origin,
            placement,
        };
        let dense = Placement::Contiguous;
        assert_eq!(
            graph_nodes(&y),
            [
                node(&[], Origin::View, dense),
                node(&[1, 1], Origin::Fresh, dense),
                node(&[3, 3], Origin::Fresh, dense),
                node(&[3, 3], Origin::View, Placement::Broadcast),
                node(&[3], Origin::Var, dense),
                node(&[3, 3], Origin::Fresh, dense),
                node(&[3, 3], Origin::Fresh, dense),
                node(&[3, 2], Origin::View, Placement::Strided),
                node(&[2, 3], Origin::Var, dense),
            ]
        );
        let params: Vec<Param> = [("w", w), ("scale", scale)]
            .into_iter()
            .map(|(name, var)| Param {
                name: name.into(),
                group: ParamGroup::Mlp,
                var,
            })
            .collect();
        let grad = |shape: &[usize], param| StoredGradient {
            shape: shape.to_vec(),
            dtype: "f32",
            param,
        };
        assert_eq!(
            stored_gradients(&y.backward()?, &params),
            [grad(&[2, 3], true), grad(&[3], true)]
        );
        Ok(())
    }
}
