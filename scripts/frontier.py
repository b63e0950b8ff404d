"""The LLaDA2.1 speed/quality claim at small scale: mask-only vs mask + T2T-noise training.

Trains tiny models identically except for the corruption (`corruption=mask_only`: M2T only, the
LLaDA2.0 recipe; `corruption=sft`: M2T + random-token noise + keep supervision, the LLaDA2.1
ingredient), one pair per seed, then decodes the task's held-out questions with the shared
sampler over a sweep of mask thresholds with T2T editing off and on (editing threshold 0, the
Speed mode's), plus the Quality and Speed presets themselves (conf/sampler/quality.yaml,
speed.yaml), and records exact match and tokens per forward (TPF). Across seeds every row gets
mean and standard deviation. Writes `<out>/frontier.json` (every seed's rows), `<out>/frontier.md`
(the table, mean +- std), `<out>/frontier.png` (the plot, error bars = std over seeds) and, with
more than one seed, `<out>/frontier_seeds.png` (one panel per seed).

    python scripts/frontier.py --task sort --seeds 0 1 2 --out results/frontier_sort
    python scripts/frontier.py --task addition --out results/frontier     # the first study
    python scripts/frontier.py --skip-training ...                         # re-sweep the runs
    python scripts/frontier.py --report-only --seeds 0 1 2 ...             # rebuild the report

Each seed's rows are also written to `<out>/seed<S>/sweep.json` as soon as its sweep ends, so
seeds can be trained and swept by separate processes (one per core) and the report rebuilt from
those files with `--report-only`, which decodes nothing.

Tasks: `sort` (recipes/tiny_sort.yaml, eval/data/sort_gen.jsonl: 17-token answers whose tokens
depend on each other, where parallel decoding can go wrong) and `addition` (recipes/tiny.yaml,
eval/data/arith_gen.jsonl: 2-3 token answers). Runs land in `<out>/seed<S>/<variant>`; an
existing finished run is reused (resume=auto). Decoding is greedy (temperature 0), so a re-sweep
of the same checkpoints reproduces its rows exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from llada_train import REPO_ROOT
from llada_train.checkpoint import resolve_model_dir
from llada_train.model.io import from_pretrained
from llada_train.rl.rewards import math_reward, sort_reward
from llada_train.sampler import PRESETS, Sampler, SamplerConfig
from llada_train.tokenizer import encode_prompt, load_tokenizer, special_ids
from llada_train.tracking import optional_pyplot

VARIANTS = {"mask_only": "corruption=mask_only", "mask_noise": "corruption=sft"}
THRESHOLDS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
TASKS = {  # recipe, held-out questions, checker (the reward the RL loop and lm-eval task use)
    "addition": ("tiny", "eval/data/arith_gen.jsonl", math_reward),
    "sort": ("tiny_sort", "eval/data/sort_gen.jsonl", sort_reward),
}


def train(
    out: str, task: str, seed: int, steps: int | None, extra: list[str], variants: list[str]
) -> None:
    if any(o.split("=")[0].lstrip("+") == "seed" for o in extra):
        raise SystemExit("pass seeds with --seeds, not as a seed= override (runs are seed<S>/)")
    for name in variants:
        corruption = VARIANTS[name]
        cmd = [sys.executable, "-m", "llada_train.sft", f"+recipe={TASKS[task][0]}", corruption,
               f"seed={seed}", f"output_dir={out}/seed{seed}/{name}", "tracking=disabled",
               "progress=false", "checkpoint.smoke_prompts=0", "checkpoint.eval_every_saves=0",
               *([f"max_steps={steps}"] if steps else []), *extra]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def decode_settings() -> list[tuple[str, dict]]:
    """(label, SamplerConfig fields): the threshold sweep with editing off and at 0, then the
    Q and S presets as they ship."""
    settings = [
        (f"sweep, editing {'on' if e is not None else 'off'}",
         {"threshold": t, "editing_threshold": e})
        for e in (None, 0.0) for t in THRESHOLDS
    ]  # fmt: skip
    for name, label in (("quality", "Q preset"), ("speed", "S preset")):
        threshold, editing, post = PRESETS[name]  # (threshold, editing_threshold, max_post_steps)
        fields = {"threshold": threshold, "editing_threshold": editing, "max_post_steps": post}
        settings.append((label, fields))
    return settings


def sweep(
    out: str, task: str, seed: int, limit: int, gen_length: int, variants: list[str]
) -> list[dict]:
    path = os.path.join(REPO_ROOT, TASKS[task][1])
    records = [json.loads(line) for line in open(path)][:limit]
    check = TASKS[task][2]
    rows = []
    for name in variants:
        model_dir = resolve_model_dir(os.path.join(out, f"seed{seed}", name))
        model, tokenizer = from_pretrained(model_dir), load_tokenizer(model_dir)
        facts = json.load(open(os.path.join(model_dir, "llada_train.json")))
        ids = special_ids(tokenizer)
        prompts = [encode_prompt(tokenizer, r["question"], None, True) for r in records]
        for label, fields in decode_settings():
            config = SamplerConfig(
                **fields, gen_length=gen_length, block_length=facts["block_length"]
            )
            result = Sampler(model, ids.mask_id, ids.eos_id, config).generate(prompts)
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
            correct = sum(check(t, r) for t, r in zip(texts, records, strict=True))
            row = {"task": task, "seed": seed, "model": name, "setting": label,
                   "editing": fields["editing_threshold"] is not None,
                   "editing_threshold": fields["editing_threshold"],
                   "threshold": fields["threshold"], "accuracy": correct / len(records),
                   "tpf": result.stats.tpf}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std (population, over seeds) of accuracy and TPF per (model, setting, threshold)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting"], r["threshold"]), []).append(r)
    table = []
    for (model, setting, threshold), rs in groups.items():
        acc, tpf = [r["accuracy"] for r in rs], [r["tpf"] for r in rs]
        table.append({"model": model, "setting": setting, "threshold": threshold,
                      "editing": rs[0]["editing"], "seeds": len(rs),
                      "accuracy_per_seed": acc,
                      "accuracy_mean": statistics.fmean(acc),
                      "accuracy_std": statistics.pstdev(acc),
                      "tpf_mean": statistics.fmean(tpf),
                      "tpf_std": statistics.pstdev(tpf)})  # fmt: skip
    return table


def write_report(rows: list[dict], out: str) -> None:
    with open(os.path.join(out, "frontier.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = aggregate(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Seeds {seeds}; mean +- std over seeds (population std; 0 with one seed); per seed in the "
        "order of --seeds.",
        "",
        "| model | setting | threshold | accuracy | per seed | TPF |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        per_seed = " / ".join(f"{a:.3f}" for a in r["accuracy_per_seed"])
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['threshold']} | "
            f"{r['accuracy_mean']:.3f} +- {r['accuracy_std']:.3f} | {per_seed} | "
            f"{r['tpf_mean']:.2f} +- {r['tpf_std']:.2f} |"
        )
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plt = optional_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_frontier(ax, table, rows[0]["task"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    if len(seeds) > 1:  # the mean hides which seed learned: one panel per seed
        fig, axes = plt.subplots(1, len(seeds), figsize=(4.5 * len(seeds), 4), sharey=True)
        for ax, seed in zip(axes, seeds, strict=True):
            draw_frontier(ax, aggregate([r for r in rows if r["seed"] == seed]), rows[0]["task"])
            ax.set_title(f"seed {seed}")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "frontier_seeds.png"), dpi=120)


def draw_frontier(ax, table: list[dict], task: str) -> None:
    """Accuracy against TPF of `aggregate` rows: the sweeps with editing off and on as lines, the
    Q and S presets as markers, error bars = std over the rows' seeds."""
    for name in sorted({r["model"] for r in table}):
        for editing, style in ((False, "--"), (True, "-")):
            label = f"sweep, editing {'on' if editing else 'off'}"
            pts = [r for r in table if r["model"] == name and r["setting"] == label]
            ax.errorbar([r["tpf_mean"] for r in pts], [r["accuracy_mean"] for r in pts],
                        xerr=[r["tpf_std"] for r in pts], yerr=[r["accuracy_std"] for r in pts],
                        fmt=style, marker="o", capsize=2,
                        label=f"{name}, editing {'on' if editing else 'off'}")  # fmt: skip
        for preset, marker in (("Q preset", "s"), ("S preset", "*")):
            (p,) = [r for r in table if r["model"] == name and r["setting"] == preset]
            ax.errorbar(p["tpf_mean"], p["accuracy_mean"], xerr=p["tpf_std"],
                        yerr=p["accuracy_std"], fmt=marker, markersize=11, capsize=2,
                        label=f"{name}, {preset}")  # fmt: skip
    ax.set_xlabel("tokens per forward (lower threshold ->)")
    ax.set_ylabel(f"exact match, held-out ({task})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/frontier_sort")
    p.add_argument("--task", choices=sorted(TASKS), default="sort")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="SFT steps (default: the recipe's)")
    p.add_argument("--limit", type=int, default=200, help="held-out questions")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--skip-training", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no training or decoding: the report from <out>/seed<S>/sweep.json",
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows_file = os.path.join(args.out, f"seed{seed}", "sweep.json")
        if args.report_only:
            if not os.path.exists(rows_file):
                raise SystemExit(f"{rows_file} is missing: sweep seed {seed} first")
            rows += json.load(open(rows_file))
            continue
        if not args.skip_training:
            train(args.out, args.task, seed, args.steps, args.overrides, args.variants)
        seed_rows = sweep(args.out, args.task, seed, args.limit, args.gen_length, args.variants)
        with open(rows_file, "w") as f:
            json.dump(seed_rows, f, indent=1)
        rows += seed_rows
    write_report(rows, args.out)


if __name__ == "__main__":
    main()
