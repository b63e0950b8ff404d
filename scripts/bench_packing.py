"""Supervised tokens/s of SFT with packing off vs on, on the shipped chats and on long-tailed ones.

    python scripts/bench_packing.py [--steps 30] [--out results/packing]

Runs the real SFT entry point (tiny model, 1 process, CPU) for `--steps` optimizer steps per
setting and reads `metrics.jsonl`: supervised tokens/s = sum of tokens/total over the steps
after the first two (warm-up) / their summed step time. The long-tailed set is written here:
chats whose answers list 1 to ~60 numbers (lengths 1 to 8 blocks of 32, most of them short), the
shape of real SFT data where a few long chats set the padding of a micro-batch. Prints a
markdown table and writes it (and the JSON) under --out. A benchmark, not a test: the figures
move with machine load; the cost model `data.pack=auto` uses is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def long_tailed_chats(path: str, num: int = 2000, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(num):
            k = min(1 + int(rng.paretovariate(1.2)), 60)  # heavy tail, capped at ~8 blocks
            numbers = [rng.randint(10, 99) for _ in range(k)]
            chat = [
                {"role": "user", "content": f"Count to {k} from {numbers[0]}."},
                {"role": "assistant", "content": " ".join(map(str, numbers))},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")


def run(name: str, steps: int, out: str, *overrides: str) -> dict:
    run_dir = os.path.join(out, name.replace(", ", "_").replace("-", "_"))
    cmd = [
        sys.executable, "-m", "llada_train.sft", "+recipe=tiny", f"output_dir={run_dir}",
        f"max_steps={steps}", "checkpoint.save_every=100000", "checkpoint.export_hf=false",
        "checkpoint.smoke_prompts=0", "tracking=disabled", "progress=false", "resume=none",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    pack_line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("data.pack")), "")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][2:]
    tokens = sum(r["tokens/total"] for r in rows)
    seconds = sum(r["step_time_s"] for r in rows)
    return {
        "setting": name,
        "supervised_tokens_per_s": tokens / seconds,
        "supervised_tokens_per_step": tokens / len(rows),
        "step_time_s": seconds / len(rows),
        "pack_line": pack_line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(REPO, "results", "packing"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tail = os.path.join(tmp, "long_tailed.jsonl")
        long_tailed_chats(tail)
        tail_data = [f"data.train_files=[{tail}]", "data.max_length=256"]
        results = [
            run("shipped, padded", args.steps, tmp, "data.pack=never"),
            run("shipped, packed", args.steps, tmp, "data.pack=always"),
            run("long-tailed, padded", args.steps, tmp, "data.pack=never", *tail_data),
            run("long-tailed, packed", args.steps, tmp, "data.pack=always", *tail_data),
        ]
    lines = [
        "| data, setting | supervised tokens/s | supervised tokens/step | s/step |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['supervised_tokens_per_s']:.0f} | "
            f"{r['supervised_tokens_per_step']:.0f} | {r['step_time_s']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    for r in results:
        print(f"{r['setting']}: {r['pack_line']}")
    with open(os.path.join(args.out, "packing.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "packing.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
