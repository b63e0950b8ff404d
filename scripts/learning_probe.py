"""Exact match of every checkpoint of an SFT run on held-out and training questions.

    python scripts/learning_probe.py RUN_DIR [--n 200]

For each `RUN_DIR/checkpoints/step_*/hf` export: the first `--n` questions of the shipped
held-out chats (data/shipped/sft_eval.jsonl) and of the training chats (sft_train.jsonl), decoded
greedily by the shared sampler (Quality preset, 32 tokens, chat template), exact match of the
stripped answer. Prints one JSON line per checkpoint and writes RUN_DIR/probe.json. Held-out
close to train means the model under-fits rather than memorises (issue 17).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from llada_train import DATA_DIR
from llada_train.model.io import from_pretrained
from llada_train.sampler import Sampler, SamplerConfig
from llada_train.tokenizer import encode_prompt, load_tokenizer, special_ids


def questions(path: str, n: int) -> list[tuple[str, str]]:
    pairs = []
    with open(path) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            pairs.append((messages[0]["content"], messages[-1]["content"]))
            if len(pairs) == n:
                break
    return pairs


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    ids = special_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, q, None, True) for q, _ in pairs]
    config = SamplerConfig.from_preset("quality", gen_length=32)
    out = Sampler(model, ids.mask_id, ids.eos_id, config).generate(prompts)
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
    hits = sum(a == gold for a, (_, gold) in zip(answers, pairs, strict=True))
    return hits / len(pairs), out.stats.tpf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = load_tokenizer()
    heldout = questions(os.path.join(DATA_DIR, "shipped", "sft_eval.jsonl"), args.n)
    train = questions(os.path.join(DATA_DIR, "shipped", "sft_train.jsonl"), args.n)
    rows = []
    for hf in sorted(glob.glob(os.path.join(args.run_dir, "checkpoints", "step_*", "hf"))):
        step = int(os.path.basename(os.path.dirname(hf)).removeprefix("step_"))
        model = from_pretrained(hf).eval()
        heldout_em, tpf = exact_match(model, tokenizer, heldout)
        train_em, _ = exact_match(model, tokenizer, train)
        rows.append({"step": step, "heldout_em": heldout_em, "train_em": train_em, "tpf": tpf})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.run_dir, "probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
