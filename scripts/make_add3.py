"""3-digit addition chats for the issue-17 learnability check (not shipped data).

    python scripts/make_add3.py OUT_DIR   # OUT_DIR/train.jsonl (20000), eval.jsonl (200)

The shipped generator (`llada_train.data.synthetic.make_sft`, the same three phrasings and the
same held-out rule by a fixed hash of the problem) with operands 100..999 instead of 10..99;
seeds 0 (train) and 1 (held-out). Every chat is 24-27 tokens with the shipped tokenizer, so one
32-token block. Train on it with
    python -m llada_train.sft +recipe=tiny "data.train_files=[OUT_DIR/train.jsonl]" \\
        "heldout.files=[OUT_DIR/eval.jsonl]" heldout.num_questions=200
"""

from __future__ import annotations

import json
import os
import random
import sys

import llada_train.data.synthetic as synthetic


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    synthetic.OPERAND_RANGES["+"] = ((100, 999), (100, 999))
    splits = {
        "train": synthetic.make_sft(random.Random(0), 20000, heldout=False),
        "eval": synthetic.make_sft(random.Random(1), 200, heldout=True),
    }
    for name, chats in splits.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for chat in chats:
                f.write(json.dumps(chat) + "\n")
        print(f"{out}/{name}.jsonl: {len(chats)} chats")


if __name__ == "__main__":
    main()
