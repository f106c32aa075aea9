#!/usr/bin/env python3
"""Checks an exported checkpoint in Hugging Face transformers against `bsfa-train eval`.

Exports CHECKPOINT with `bsfa-train export`, loads it with `LlamaForCausalLM.from_pretrained`
(failing on any missing or unexpected weight), computes the mean next-token loss over the
non-overlapping windows of an llm.c token shard (window i = tokens[i*seq : i*seq + seq + 1]),
and compares it with `bsfa-train eval --data shards:SHARD` on the same windows. Needs `torch`
and `transformers` (not used by CI):

    cargo build --release
    python3 scripts/check_export.py --checkpoint runs/tiny/checkpoints/step-00000200 \
        --shard val.bin
    # no shard yet? write one from a text file with the bytes tokenizer (ids = UTF-8 bytes):
    python3 scripts/check_export.py --checkpoint ... --shard val.bin --text-for-bytes README.md

Exits non-zero when the two losses differ by more than --tolerance.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

HEADER_INTS = 256


def read_shard(path):
    """Token ids of an llm.c shard, read from the format's definition."""
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(HEADER_INTS * 4))
        width = {20240520: 2, 20240801: 4}[header[0]]
        data = f.read()
    count = header[2]
    assert len(data) == count * width, f"{path}: size disagrees with the header"
    fmt = "<%d%s" % (count, "H" if width == 2 else "I")
    return list(struct.unpack(fmt, data))


def write_bytes_shard(text_path, shard_path):
    ids = open(text_path, "rb").read()
    header = [0] * HEADER_INTS
    header[0], header[1], header[2] = 20240520, 1, len(ids)
    with open(shard_path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack("<%dH" % len(ids), *ids))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shard", required=True, help="an llm.c .bin token file")
    p.add_argument("--text-for-bytes", help="write --shard first from this text, one id per byte")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--binary", default="target/release/bsfa-train")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    if args.text_for_bytes:
        write_bytes_shard(args.text_for_bytes, args.shard)
    export = os.path.join(tempfile.mkdtemp(), "hf")
    subprocess.run([args.binary, "export", "--checkpoint", args.checkpoint, "--out", export], check=True)
    out = subprocess.run(
        [args.binary, "eval", "--checkpoint", args.checkpoint, "--data", "shards:" + args.shard,
         "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)],
        check=True, capture_output=True, text=True,
    ).stdout
    ours = json.loads(out.strip().splitlines()[-1])

    model, info = LlamaForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"transformers reported weight problems: {problems}")
    model.eval()
    ids = read_shard(args.shard)
    seq = args.seq_len
    windows = [ids[i * seq : i * seq + seq + 1] for i in range((len(ids) - 1) // seq)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(windows), args.batch_size):
            batch = torch.tensor(windows[b : b + args.batch_size], dtype=torch.long)
            # labels = inputs: transformers shifts them, so the targets are the next `seq` ids.
            loss = model(input_ids=batch, labels=batch).loss.item()
            n = batch.shape[0] * seq
            total += loss * n
            tokens += n
    theirs = total / tokens
    print(json.dumps({
        "bsfa_train_eval_loss": ours["val_loss"],
        "transformers_loss": theirs,
        "abs_diff": abs(ours["val_loss"] - theirs),
        "tokens": tokens,
        "bsfa_train_tokens": ours["tokens"],
        "torch": torch.__version__,
    }))
    if ours["tokens"] != tokens or abs(ours["val_loss"] - theirs) > args.tolerance:
        sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
