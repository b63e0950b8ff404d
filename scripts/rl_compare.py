"""Does RL help? EBPO vs the GRPO baseline vs EBPO with dual mode off, from one SFT checkpoint.

Runs `python -m llada_train.rl` once per (seed, variant) from the same `--init` checkpoint with
the same recipe, then reads each run's held-out reward curve (`eval/reward` in metrics.jsonl:
greedy decoding of the recipe's held-out prompts, logged at step 0, every `eval_every` rollout
batches and at the end) and its wall time. Writes `<out>/rl_compare.json` (every run's curve),
`<out>/rl_compare.md` (start, end, gain and best per variant, mean +- std over seeds) and
`<out>/rl_compare.png` (the curves, error bars = std over seeds).

    python scripts/rl_compare.py --init runs/sft_headroom \\
        --seeds 0 1 2 --out results/ebpo max_steps=30 eval_every=10   # results/ebpo/README.md

Variants (issue 17, item 4): `ebpo` (conf=ebpo, the recipe's dual-mode share of rollout groups
decoded with T2T editing on), `grpo` (conf=grpo: the same rollouts, the GRPO-style
length-normalised sequence ratio), `ebpo_no_dual` (conf=ebpo, rollout.dual_mode_fraction=0:
every rollout M2T only). Runs land in `<out>/seed<S>/<variant>` (with `wall_s.txt`, the run's
wall time as launched here); a finished run is reused (resume=auto), so `--skip-training` only
re-reads them. Extra Hydra overrides after the options
go to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from llada_train.tracking import optional_pyplot, read_metrics

VARIANTS = {
    "ebpo": ["conf=ebpo"],
    "grpo": ["conf=grpo"],
    "ebpo_no_dual": ["conf=ebpo", "rollout.dual_mode_fraction=0.0"],
}


def train(out: str, init: str, recipe: str, seed: int, variant: str, extra: list[str]) -> None:
    """One RL run; its wall time (seconds) goes to `<run>/wall_s.txt` on its first launch."""
    run_dir = os.path.join(out, f"seed{seed}", variant)
    cmd = [sys.executable, "-m", "llada_train.rl", *VARIANTS[variant], f"+recipe={recipe}",
           f"init_from={init}", f"seed={seed}", f"output_dir={run_dir}", "tracking=disabled",
           "progress=false", *extra]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(out, f"seed{seed}_{variant}.log"), "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    path = os.path.join(run_dir, "wall_s.txt")
    if not os.path.exists(path):  # a reused finished run keeps the time of its real launch
        with open(path, "w") as f:
            f.write(f"{wall:.1f}\n")


def recorded_wall(run_dir: str) -> float:
    """The wall time `train` recorded for a run (seconds; 0.0 when it was not timed)."""
    path = os.path.join(run_dir, "wall_s.txt")
    return float(open(path).read()) if os.path.exists(path) else 0.0


def curve(run_dir: str) -> list[tuple[int, float]]:
    """[(step, held-out reward)] of one run, in step order; a resumed run's repeats dropped."""
    points = {int(m["step"]): float(m["eval/reward"]) for m in read_metrics(run_dir)
              if "eval/reward" in m}  # fmt: skip
    if not points:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no eval/reward: was eval_files set?")
    return sorted(points.items())


def summarize(runs: list[dict]) -> list[dict]:
    """Per variant: mean and population std over seeds of start, end, gain and best reward."""
    table = []
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        row = {"variant": variant, "seeds": [r["seed"] for r in rs]}
        for key in ("start", "end", "gain", "best"):
            values = [r[key] for r in rs]
            row[f"{key}_mean"], row[f"{key}_std"] = (
                statistics.fmean(values),
                statistics.pstdev(values),
            )
        row["wall_s_mean"] = statistics.fmean(r["wall_s"] for r in rs)
        table.append(row)
    return table


def write_report(runs: list[dict], out: str) -> None:
    with open(os.path.join(out, "rl_compare.json"), "w") as f:
        json.dump(runs, f, indent=1)
    table = summarize(runs)
    lines = [
        "Held-out reward (greedy), mean +- std over seeds (population std). gain = end - start;"
        " best = the highest logged point of a run.",
        "",
        "| variant | seeds | start | end | gain | best | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cells = " | ".join(
            f"{r[k + '_mean']:.3f} +- {r[k + '_std']:.3f}" for k in ("start", "end", "gain", "best")
        )
        lines.append(f"| {r['variant']} | {r['seeds']} | {cells} | {r['wall_s_mean']:.0f} |")
    lines += ["", "| variant | seed | curve (step: reward) |", "|---|---|---|"]
    for r in runs:
        points = ", ".join(f"{s}: {v:.3f}" for s, v in r["curve"])
        lines.append(f"| {r['variant']} | {r['seed']} | {points} |")
    with open(os.path.join(out, "rl_compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = optional_pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        steps = sorted(set.intersection(*({s for s, _ in r["curve"]} for r in rs)))
        by_step = [[dict(r["curve"])[s] for r in rs] for s in steps]
        ax.errorbar(steps, [statistics.fmean(v) for v in by_step],
                    yerr=[statistics.pstdev(v) for v in by_step], marker="o", capsize=2,
                    label=f"{variant} ({len(rs)} seeds)")  # fmt: skip
    ax.set_xlabel("rollout batch (RL step)")
    ax.set_ylabel("held-out reward (greedy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rl_compare.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", required=True, help="SFT checkpoint (or run dir: its latest)")
    p.add_argument("--recipe", default="tiny", help="recipes/rl/NAME.yaml")
    p.add_argument("--out", default="results/ebpo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    if any(o.split("=")[0].lstrip("+") in ("seed", "init_from") for o in args.overrides):
        raise SystemExit("pass seeds with --seeds and the checkpoint with --init")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = os.path.join(args.out, f"seed{seed}", variant)
            if not args.skip_training:
                train(args.out, args.init, args.recipe, seed, variant, args.overrides)
            wall = recorded_wall(run_dir)
            points = curve(run_dir)
            runs.append({"variant": variant, "seed": seed, "curve": points,
                         "start": points[0][1], "end": points[-1][1],
                         "gain": points[-1][1] - points[0][1],
                         "best": max(v for _, v in points), "wall_s": wall})  # fmt: skip
    write_report(runs, args.out)


if __name__ == "__main__":
    main()
