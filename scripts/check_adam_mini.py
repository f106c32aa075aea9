#!/usr/bin/env python3
"""Cross-checks our Adam-mini against the official implementation (PyPI adam-mini 1.1.1).

Both sides start from the same tiny LLaMA weights and train on the same batch (one window of
text repeated, so our random sampler has no choice), with the same lr, betas, eps and weight
decay, no clipping and a constant learning rate. After each of --steps steps the script
compares the weights: for every tensor, |delta_ours - delta_official| / |delta_official|, where
delta is the change since the initial weights. Needs torch, transformers and adam-mini (not
used by CI):

    pip install torch transformers adam-mini==1.1.1
    cargo build --release
    python3 scripts/check_adam_mini.py [--steps 3] [--kv-heads 2]

How the initial weights are obtained: a run with lr 1e-30 moves no f32 weight, so its step-1
checkpoint holds the initial weights; a second run with the same seed and the real lr writes a
checkpoint after every step.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/bsfa-train")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kv-heads", type=int, default=2, help="grouped-query attention (4 heads)")
    p.add_argument("--tolerance", type=float, default=1e-3)
    args = p.parse_args()

    import torch
    from adam_mini import Adam_mini
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    work = tempfile.mkdtemp()
    seq, batch, hidden, heads = 64, 4, 64, 4
    text = ("The quick brown fox jumps over the lazy dog; " * 3)[: seq + 1]
    data = os.path.join(work, "window.txt")
    with open(data, "w") as f:
        f.write(text)
    common = [
        args.binary, "--data", "text:" + data, "--val-data", "text:" + data,
        "--set", f"model.hidden_size={hidden}", "--set", "model.num_hidden_layers=2",
        "--set", "model.intermediate_size=172", "--set", f"model.num_attention_heads={heads}",
        "--set", f"model.num_key_value_heads={args.kv_heads}",
        "--batch-size", str(batch), "--seq-len", str(seq), "--eval-batches", "1",
        "--optimizer", "adam-mini", "--warmup-steps", "0", "--min-lr-ratio", "1",
        "--grad-clip", "0", "--set", "optimizer.weight_decay=0.1", "--threads", "1",
    ]
    run = lambda extra: subprocess.run(common + extra, check=True, capture_output=True)
    run(["--lr", "1e-30", "--steps", "1", "--out", os.path.join(work, "init")])
    run(["--lr", str(args.lr), "--steps", str(args.steps), "--checkpoint-every", "1",
         "--keep-checkpoints", str(args.steps), "--out", os.path.join(work, "ours")])
    export = os.path.join(work, "hf")
    subprocess.run([args.binary, "export", "--checkpoint", os.path.join(work, "init/checkpoints/step-00000001"),
                    "--out", export], check=True, capture_output=True)

    model, info = LlamaForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = Adam_mini(
        named_parameters=model.named_parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
        weight_decay=0.1, model_sharding=False, dim=hidden, n_heads=heads, n_kv_heads=args.kv_heads,
        verbose=False,
    )
    ids = torch.tensor([list(text.encode())] * batch, dtype=torch.long)
    worst = 0.0
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        ours = load_file(os.path.join(work, f"ours/checkpoints/step-{step:08d}/model.safetensors"))
        errors = {}
        for name, theirs in model.named_parameters():
            d_theirs = theirs.detach() - init[name]
            d_ours = ours[name] - init[name]
            errors[name] = ((d_ours - d_theirs).norm() / d_theirs.norm()).item()
        name = max(errors, key=errors.get)
        worst = max(worst, errors[name])
        print(json.dumps({"step": step, "tensors": len(errors), "max_rel_err": errors[name],
                          "worst_tensor": name, "median_rel_err": sorted(errors.values())[len(errors) // 2]}))
    print(json.dumps({"adam_mini": "1.1.1", "torch": torch.__version__, "steps": args.steps,
                      "max_rel_err": worst, "ok": worst <= args.tolerance}))
    if worst > args.tolerance:
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
