#!/usr/bin/env python3
"""Checks `bsfa-train sample` against Hugging Face transformers' `generate`, greedy.

Exports CHECKPOINT with `bsfa-train export` (or takes a folder `export` already wrote),
continues PROMPT with `bsfa-train sample --temperature 0` on it, and with
`LlamaForCausalLM.from_pretrained(...).generate(do_sample=False)` on the same folder, stopping
at the tokenizer's end-of-text token in both, and compares the token ids. The prompt's ids
come from the folder's tokenizer.json through transformers (or, for a run that used the bytes
tokenizer, are the prompt's UTF-8 bytes). Needs `torch` and `transformers`
(`scripts/install_test_tools.sh` installs both; the tests run this script):

    cargo build --release
    python3 scripts/check_sample.py --checkpoint runs/tiny/checkpoints/step-00000200 \
        --prompt "alice " --max-new-tokens 100

Prints one JSON line (both id lists, whether they agree, where they first differ) and exits
non-zero when they differ.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

END_OF_TEXT = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a folder `bsfa-train export` wrote")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--binary", default="target/release/bsfa-train")
    args = parser.parse_args()

    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        if not os.path.isfile(os.path.join(folder, "config.json")) or os.path.isfile(
            os.path.join(folder, "trainer.json")
        ):
            folder = os.path.join(tmp, "hf")
            subprocess.run([args.binary, "export", "--checkpoint", args.checkpoint,
                            "--out", folder], check=True, stdout=subprocess.DEVNULL)
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        command = [args.binary, "sample", "--checkpoint", folder, "--prompt", args.prompt,
                   "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens),
                   "--device", "cpu"]
        eos = None
        if os.path.isfile(tokenizer_file):
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
            prompt = tokenizer.encode(args.prompt, add_special_tokens=False)
            ids = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TEXT]
            eos = next((i for i in ids if i is not None and i != tokenizer.unk_token_id), None)
        else:
            command += ["--tokenizer", "bytes"]
            prompt = list(args.prompt.encode("utf-8"))
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        ours = json.loads(done.stderr.strip().splitlines()[-1])["ids"]

        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0,
            )
        theirs = out[0, len(prompt):].tolist()

    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                 None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
    print(json.dumps({"prompt_ids": prompt, "ours": ours, "transformers": theirs,
                      "match": first is None, "first_difference": first}))
    sys.exit(0 if first is None else 1)


if __name__ == "__main__":
    main()
