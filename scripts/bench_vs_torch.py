#!/usr/bin/env python3
"""Times bsfa-train against PyTorch (Hugging Face LlamaForCausalLM) on the same model.

Same dims, batch, sequence length, thread count, f32, AdamW (betas 0.9/0.95, weight decay
0.1 on matrices) and gradient clipping at 1.0. Each contender runs in its own process so
its peak RSS is its own. Needs `torch` and `transformers` (not used by CI):

    pip install torch transformers
    cargo build --release
    python3 scripts/bench_vs_torch.py                    # reference shape
    python3 scripts/bench_vs_torch.py --shape llama72m   # the paper's 72M preset, batch 4
    python3 scripts/bench_vs_torch.py --compile          # also torch.compile

A small shared machine drifts by 10-20% between runs, so the contenders run interleaved for
--rounds rounds and the table shows each one's median over the rounds (ratios of medians),
then every round's ratios.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # vocab, hidden, layers, heads, intermediate, seq, batch
    "ref": dict(vocab=8192, hidden=256, layers=4, heads=8, intermediate=688, seq=256, batch=8),
    "llama72m": dict(vocab=50304, hidden=400, layers=16, heads=10, intermediate=1120, seq=150, batch=4),
}


def torch_variant(args, shape):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = "sdpa" if args.variant in ("sdpa", "compile") else "eager"
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).float().train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    vocab, batch, seq = shape["vocab"], shape["batch"], shape["seq"]

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, vocab), y.view(-1))

    if args.variant == "compile":
        loss_fn = torch.compile(loss_fn)
    times, fwd, bwd, upd = [], [], [], []
    for step in range(args.warmup + args.iters):
        tokens = torch.randint(0, vocab, (batch, seq + 1))
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= args.warmup:
            times.append(t3 - t0)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
    step_s = statistics.median(times)
    print(json.dumps({
        "params": sum(p.numel() for p in model.parameters()),
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": batch * seq / step_s,
        "forward_ms": statistics.median(fwd) * 1e3,
        "backward_ms": statistics.median(bwd) * 1e3,
        "optimizer_ms": statistics.median(upd) * 1e3,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }))


def ours(args, shape):
    cmd = [
        args.bin, "bench",
        "--set", f"model.vocab_size={shape['vocab']}",
        "--set", f"model.hidden_size={shape['hidden']}",
        "--set", f"model.num_hidden_layers={shape['layers']}",
        "--set", f"model.num_attention_heads={shape['heads']}",
        "--set", f"model.num_key_value_heads={shape['heads']}",
        "--set", f"model.intermediate_size={shape['intermediate']}",
        "--set", f"model.max_position_embeddings={max(shape['seq'], 1024)}",
        "--seq-len", str(shape["seq"]), "--batch-size", str(shape["batch"]),
        "--threads", str(args.threads), "--optimizer", "adamw",
        "--warmup", str(args.warmup), "--iters", str(args.iters),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_child(args, variant):
    cmd = [sys.executable, __file__, "--variant", variant, "--shape", args.shape,
           "--threads", str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="ref")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "bsfa-train"))
    p.add_argument("--variant", choices=["eager", "sdpa", "compile"], help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = SHAPES[args.shape]
    if args.variant:
        torch_variant(args, shape)
        return
    names = ["bsfa-train"] + [f"torch-{v}" for v in ["eager", "sdpa"] + (["compile"] if args.compile else [])]
    rounds = []
    for _ in range(args.rounds):
        rounds.append({name: ours(args, shape) if name == "bsfa-train" else run_child(args, name[len("torch-"):])
                       for name in names})
    fields = ["tokens_per_s", "ms_per_step", "forward_ms", "backward_ms", "optimizer_ms", "peak_rss_mib"]
    med = {name: {f: statistics.median(r[name][f] for r in rounds) for f in fields} for name in names}
    base = med["bsfa-train"]["tokens_per_s"]
    print(f"shape {args.shape} {shape} threads {args.threads}, median of {args.rounds} interleaved rounds")
    print(f"{'':14} {'tokens/s':>10} {'ms/step':>9} {'fwd':>7} {'bwd':>7} {'opt':>6} {'peak MiB':>9} {'ours/them':>9}")
    for name, r in med.items():
        print(f"{name:14} {r['tokens_per_s']:10.0f} {r['ms_per_step']:9.1f} {r['forward_ms']:7.1f} "
              f"{r['backward_ms']:7.1f} {r['optimizer_ms']:6.1f} {r['peak_rss_mib']:9.0f} "
              f"{base / r['tokens_per_s']:9.2f}")
    for i, r in enumerate(rounds):
        ratios = ", ".join(f"{n} {r['bsfa-train']['tokens_per_s'] / r[n]['tokens_per_s']:.2f}" for n in names[1:])
        print(f"round {i + 1}: ours/{ratios}")
    print(json.dumps({"median": med, "rounds": rounds}))


if __name__ == "__main__":
    main()
