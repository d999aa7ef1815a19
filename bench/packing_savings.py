"""Benchmark how much padding sequence packing saves on the bundled pydoc_summaries training data.

Tokenizes every row as a ChatML exchange (prompt masked), truncates to cutoff_len, then prints for each
cutoff: rows, tokens, padding share and optimizer steps per epoch, unpacked vs neat-packed (SFT), plus the
rows pack_pretraining makes of the same texts. Batches are formed in a seeded shuffled order, as the
Trainer's random sampler would, and padded to their longest row.

    .venv/bin/python bench/packing_savings.py [--tokenizer PATH] [--batch 8] [--cutoffs 256 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "configs" / "data" / "pydoc_summaries_train.jsonl"

from tasks.packing import neat_pack, pack_pretraining, padding_share  # noqa: E402
from tasks.templates import IGNORE_INDEX  # noqa: E402


def load_rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def tiny_tokenizer(rows: list[dict]):
    """The 600-token byte-level BPE tests/conftest.py trains on the same data."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = [row["input"] + "\n" + row["output"] for row in rows]
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """ChatML prompt and reply ids; labels mask the prompt."""
    user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
    prompt = tokenizer.encode(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    reply = tokenizer.encode(f"{row['output']}<|im_end|>\n", add_special_tokens=False)
    return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply


def shuffled(values: list[int], seed: int = 0) -> list[int]:
    values = list(values)
    random.Random(seed).shuffle(values)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or hub id (default: the tests' tiny BPE)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoffs", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()

    import transformers

    rows = load_rows()
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = tiny_tokenizer(rows)
    examples = [encode(tokenizer, row) for row in rows]
    documents = [[*ids, tokenizer.eos_token_id] for ids, _ in examples]  # each ends in EOS, as encode_document's
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"python={platform.python_version()} transformers={transformers.__version__}"
    )
    print(
        f"date: {time.strftime('%Y-%m-%d')}  data: {DATA.name} ({len(rows)} rows)  "
        f"tokenizer: {args.tokenizer or 'tiny BPE (600 tokens, as tests/conftest.py)'}  batch: {args.batch}"
    )
    header = f"{'cutoff':>6}  {'layout':<9} {'rows':>5} {'tokens':>7} {'padded':>7} {'padding':>8} {'steps/epoch':>11}"
    print(header)
    for cutoff in args.cutoffs:
        cut = [(ids[:cutoff], labels[:cutoff]) for ids, labels in examples]
        plain = shuffled([len(ids) for ids, _ in cut])
        packed = shuffled([len(row["input_ids"]) for row in neat_pack(cut, cutoff)])
        blocks = [len(block) for block in pack_pretraining(documents, cutoff)]
        for layout, lengths in (("unpacked", plain), ("neat_pack", packed), ("pt blocks", blocks)):
            share = padding_share(lengths, args.batch)
            tokens = sum(lengths)
            padded = sum(
                max(lengths[i : i + args.batch]) * len(lengths[i : i + args.batch])
                for i in range(0, len(lengths), args.batch)
            )
            steps = -(-len(lengths) // args.batch)
            print(f"{cutoff:>6}  {layout:<9} {len(lengths):>5} {tokens:>7} {padded:>7} {share:>8.1%} {steps:>11}")
    lengths = sorted(len(ids) for ids in documents)
    print(f"sample lengths: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens")


if __name__ == "__main__":
    main()
