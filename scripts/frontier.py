"""The LLaDA2.1 speed/quality claim at small scale: mask-only vs mask + T2T-noise training.

Trains two tiny models identically except for the corruption (`corruption=mask_only`: M2T only,
the LLaDA2.0 recipe; `corruption=sft`: M2T + random-token noise + keep supervision, the LLaDA2.1
ingredient), then decodes the held-out arithmetic questions (eval/data/arith_gen.jsonl) with the
shared sampler over a sweep of mask thresholds, with T2T editing on (editing threshold 0, the
Speed mode's) and off, and records exact-match accuracy and tokens per forward (TPF). Writes
`<out>/frontier.json`, `<out>/frontier.md` (the table) and `<out>/frontier.png` (the plot).

    python scripts/frontier.py --out results/frontier                    # ~20 min on 2 cores
    python scripts/frontier.py --skip-training --out results/frontier    # re-sweep existing runs

Seeds: training seed 0 (corruption, data order, init), decoding temperature 0 (deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from llada_train import REPO_ROOT
from llada_train.checkpoint import resolve_model_dir
from llada_train.model.io import from_pretrained
from llada_train.rl.rewards import math_reward
from llada_train.sampler import Sampler, SamplerConfig
from llada_train.tokenizer import encode_prompt, load_tokenizer, special_ids

VARIANTS = {"mask_only": "corruption=mask_only", "mask_noise": "corruption=sft"}
THRESHOLDS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def train(out: str, steps: int | None, extra: list[str]) -> None:
    for name, corruption in VARIANTS.items():
        cmd = [sys.executable, "-m", "llada_train.sft", "+recipe=tiny", corruption,
               f"output_dir={out}/{name}", "tracking=disabled", "checkpoint.smoke_prompts=0",
               "checkpoint.eval_every_saves=0",
               *([f"max_steps={steps}"] if steps else []), *extra]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def sweep(out: str, limit: int, gen_length: int) -> list[dict]:
    records = [
        json.loads(line) for line in open(os.path.join(REPO_ROOT, "eval/data/arith_gen.jsonl"))
    ]
    records = records[:limit]
    rows = []
    for name in VARIANTS:
        model_dir = resolve_model_dir(os.path.join(out, name))
        model, tokenizer = from_pretrained(model_dir), load_tokenizer(model_dir)
        ids = special_ids(tokenizer)
        prompts = [encode_prompt(tokenizer, r["question"], None, True) for r in records]
        for editing in (None, 0.0):
            for threshold in THRESHOLDS:
                config = SamplerConfig(
                    threshold=threshold, editing_threshold=editing, gen_length=gen_length
                )
                result = Sampler(model, ids.mask_id, ids.eos_id, config).generate(prompts)
                texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
                correct = sum(
                    math_reward(t, r) for t, r in zip(texts, records, strict=True)
                )  # the checker of llada_arith_gen and of the RL math reward
                row = {"model": name, "editing": editing is not None, "threshold": threshold,
                       "accuracy": correct / len(records), "tpf": result.stats.tpf,
                       "tokens_per_s": result.stats.tokens_per_s}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def write_report(rows: list[dict], out: str) -> None:
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| model | editing | threshold | accuracy | TPF |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'on (0.0)' if r['editing'] else 'off'} | {r['threshold']} "
                     f"| {r['accuracy']:.3f} | {r['tpf']:.2f} |")  # fmt: skip
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table written, plot skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in VARIANTS:
        for editing, style in ((False, "--"), (True, "-")):
            pts = [r for r in rows if r["model"] == name and r["editing"] == editing]
            ax.plot([r["tpf"] for r in pts], [r["accuracy"] for r in pts], style, marker="o",
                    label=f"{name}, editing {'on' if editing else 'off'}")  # fmt: skip
    ax.set_xlabel("tokens per forward (lower threshold ->)")
    ax.set_ylabel("exact match, held-out arithmetic")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/frontier")
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default: the recipe's)")
    p.add_argument("--limit", type=int, default=200, help="held-out questions")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both trainings")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.skip_training:
        train(args.out, args.steps, args.overrides)
    write_report(sweep(args.out, args.limit, args.gen_length), args.out)


if __name__ == "__main__":
    main()
