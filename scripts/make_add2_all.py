"""Every 2-digit addition outside the held-out split, in every phrasing (issue-17 data ablation).

    python scripts/make_add2_all.py OUT.jsonl   # 21,828 chats, shuffled (seed "0:sft_train_full")

The shipped `sft_train.jsonl` samples 8000 chats (6,718 distinct prompts); this file has every
ordered pair a + b (10 <= a, b <= 99) that `is_heldout_problem` leaves in training, times the
three question templates of `llada_train.data.synthetic`. Train on it with
    python -m llada_train.sft +recipe=tiny "data.train_files=[OUT.jsonl]"
"""

from __future__ import annotations

import json
import random
import sys

import llada_train.data.synthetic as synthetic


def main() -> None:
    chats = [
        {"messages": [{"role": "user", "content": template.format(a=a, op="+", b=b)},
                      {"role": "assistant", "content": str(a + b)}]}
        for a in range(10, 100)
        for b in range(10, 100)
        if not synthetic.is_heldout_problem("+", a, b)
        for template in synthetic.DIRECT_TEMPLATES
    ]  # fmt: skip
    random.Random("0:sft_train_full").shuffle(chats)
    with open(sys.argv[1], "w") as f:
        for chat in chats:
            f.write(json.dumps(chat) + "\n")
    print(f"{sys.argv[1]}: {len(chats)} chats")


if __name__ == "__main__":
    main()
