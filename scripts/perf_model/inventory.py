"""`--check-inventory FILE`: the model's graph against the one the Rust code builds.

FILE holds, per traced configuration (tests/perf_model.rs writes it), the nodes candle's
`Tensor::backward` visits from the loss of one micro-batch built through the reference ops
in bf16 (src/model/graph.rs), the gradients its store keeps after the backward, the
parameters with their Adam-mini blocks, and the candle-core release Cargo.lock pins. The model
builds its own graph at the same shapes and must agree on every point: a kernel added to,
dropped from or moved in the reference path, or a shape, type or layout changed, fails."""
import json
import sys
from collections import Counter

from .backward import backward, sorted_nodes
from .forward import forward, make_weights
from .hw import (BSFA_GROUPS, BSFA_K, BSFA_L, BSFA_T, CANDLE, LLAMA134M, MICRO_PER_STEP,
                 Dims)
from .optim import param_shapes
from .sim import S

# The model's parameter names and groups, and the part of the Hugging Face name / the
# ParamGroup each stands for.
NAMES = {"embed": "embed_tokens", "norm": "norm", "q": "q_proj", "k": "k_proj", "v": "v_proj",
         "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
         "head": "lm_head"}
GROUPS = {"embed": "embeddings", "norm": "norms", "attn": "attention", "mlp": "mlp",
          "head": "head"}


def node_signatures(nodes):
    """What src/model/graph.rs records of each node: shape, type, origin, placement."""
    owner = {id(t.storage): i for i, t in enumerate(nodes)}
    out = []
    for i, t in enumerate(nodes):
        origin = "var" if t.var else ("view" if owner[id(t.storage)] != i else "fresh")
        placement = ("contiguous" if t.contig else
                     "broadcast" if t.bcast_src is not None else "strided")
        out.append({"shape": list(t.shape), "dtype": t.dtype, "origin": origin,
                    "placement": placement})
    return out


def grad_signatures(store, var_ids):
    """The store left by the backward, parameters first, as src/model/graph.rs lists it."""
    sig = [{"shape": list(store[i].shape), "dtype": store[i].dtype, "param": True}
           for i in var_ids if i in store]
    others = sorted(((list(g.shape), g.dtype) for i, g in store.items() if i not in var_ids))
    return sig + [{"shape": s, "dtype": dt, "param": False} for s, dt in others]


def modelled(d):
    """The model's nodes (signatures and tensors) and stored gradients at shapes `d`."""
    weights = make_weights(d)
    var_ids = [weights["embed"].id]
    for layer in weights["layers"]:
        var_ids += [w.id for w in layer.values()]
    var_ids += [weights["norm"].id, weights["head"].id]
    root = forward(d, weights)
    nodes = sorted_nodes(root)
    store = backward(root)[0]
    return nodes, node_signatures(nodes), grad_signatures(store, var_ids)


def first_difference(ours, theirs, describe):
    """Where two lists first differ, in words; None where they are equal."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"at {i}: model {a} ({describe(i)}), code {b}"
    if len(ours) != len(theirs):
        return f"model has {len(ours)}, code {len(theirs)}"
    return None


def param_problems(d, params):
    ours = param_shapes(d)
    if len(ours) != len(params):
        return [f"parameters: model has {len(ours)}, code {len(params)}"]
    problems = []
    for (name, shape, group, block), p in zip(ours, params):
        if (NAMES[name] not in p["name"] or list(shape) != p["shape"]
                or GROUPS[group] != p["group"] or block != p["adam_mini_block"]):
            problems.append(f"parameter {p}: model has {name} {shape} {group} block {block}")
    return problems


def workload_problems(workload):
    """The preset's micro-batch, sequence, batch and BSFA settings against the model's."""
    ours = {"B": LLAMA134M.B, "T": LLAMA134M.T, "micro_batches": MICRO_PER_STEP,
            "bsfa_rank": BSFA_K, "bsfa_history": BSFA_L, "bsfa_interval": BSFA_T,
            "bsfa_groups": [GROUPS[g] for g in BSFA_GROUPS]}
    return [f"configs/llama134m.json: {k} is {workload[k]}, the model's {v}"
            for k, v in ours.items() if workload[k] != v]


def check(trace):
    """The differences between the model and one traced configuration, in words."""
    d = Dims(**trace["dims"])
    problems = []
    if trace["candle"] != CANDLE:
        problems.append(f"Cargo.lock pins candle-core {trace['candle']}, the model replays "
                        f"{CANDLE}: review backward.py's rules against its backprop.rs")
    if d.KV != d.H:
        problems.append("the model has no repeat_kv: it needs num_key_value_heads == heads")
        return problems
    if trace["preset"] == "llama134m":
        widths = ("C", "H", "KV", "I", "V", "L")
        if any(getattr(d, k) != getattr(LLAMA134M, k) for k in widths):
            problems.append(f"configs/llama134m.json is {trace['dims']}, the model's shapes "
                            f"{ {k: getattr(LLAMA134M, k) for k in widths} }")
        problems += workload_problems(trace["workload"])
    S.group = "parameters"
    nodes, ours, grads = modelled(d)
    where = first_difference(ours, trace["nodes"],
                             lambda i: f"{nodes[i].op or 'variable'} in {nodes[i].group}")
    if where:
        problems.append("graph nodes differ " + where)
    where = first_difference(grads, trace["gradients"], lambda i: "stored gradient")
    if where:
        problems.append("stored gradients differ " + where)
    return problems + param_problems(d, trace["params"])


def summary(trace):
    kinds = Counter(n["origin"] for n in trace["nodes"])
    kept = Counter(g["param"] for g in trace["gradients"])
    return (f"{trace['preset']} {trace['dims']}: {len(trace['nodes'])} nodes ({kinds['fresh']} "
            f"kernels, {kinds['view']} views, {kinds['var']} variables), {kept[True]} parameter "
            f"and {kept[False]} orphan gradients")


def main(path):
    with open(path) as f:
        traces = json.load(f)
    failed = False
    for trace in traces:
        problems = check(trace)
        print(("DRIFT " if problems else "ok ") + summary(trace))
        for p in problems:
            print("  " + p)
        failed |= bool(problems)
    sys.exit(1 if failed else 0)
