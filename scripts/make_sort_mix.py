"""Sorting chats with shorter lists mixed in, for the issue-17 sorting-cliff check (not shipped).

    python scripts/make_sort_mix.py OUT.jsonl [--short 10000] [--seed 0]

Writes the shipped 6-number training chats (data/shipped/sort_sft_train.jsonl, 20000) followed
by `--short` chats whose lists have 2, 3, 4 or 5 numbers (a quarter each), drawn by the shipped
generator (`llada_train.data.synthetic.make_sort_sft`: the same phrasings, 10..99, training
split by the same fixed hash) with its `length` set per length. The held-out 6-number lists
and the lm-eval task are unchanged. Train on it with
    python -m llada_train.sft +recipe=tiny_sort "data.train_files=[OUT.jsonl]"
"""

from __future__ import annotations

import argparse
import json
import os
import random

import llada_train.data.synthetic as synthetic
from llada_train import DATA_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--short", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(os.path.join(DATA_DIR, "shipped", "sort_sft_train.jsonl")) as f:
        chats = [json.loads(line) for line in f]
    shipped = len(chats)
    lengths = (2, 3, 4, 5)
    for i, length in enumerate(lengths):
        count = args.short // len(lengths) + (i < args.short % len(lengths))
        rng = random.Random(args.seed * 10 + length)
        chats += synthetic.make_sort_sft(rng, count, heldout=False, length=length)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for chat in chats:
            f.write(json.dumps(chat) + "\n")
    print(f"{args.out}: {shipped} shipped 6-number chats + {len(chats) - shipped} shorter")


if __name__ == "__main__":
    main()
