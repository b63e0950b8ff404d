"""Does a recipe learn on any machine? Run it under seeds x float-rounding perturbations.

A recipe whose learning depends on where float rounding puts a plateau's end is luck, not a
recipe (issue 26). This runs the real entry point for every (seed, perturbation) variant, one
training per core (`OMP_NUM_THREADS=1`, `--jobs` at a time), and reports per variant the
held-out exact match at every check (`heldout.every`, the shared sampler on the first
`--questions` held-out chats, Quality preset), the first step with >= `--goal`, the end figure,
and the spread over the variants.

Perturbations (each changes the float rounding of the run the way another machine does, and is
checked to do so: the report gives the largest loss difference against the unperturbed run's
first logged steps when that run is part of the sweep, else between the two perturbations):
    none    the recipe as it is
    split   the same global batch in micro-batches of half the size (other gradient-sum order:
            what users do to fit memory)
    jitter  every initial weight times (1 + 1e-6 N(0, 1)) (`init_jitter=1e-6`)
(`OMP_NUM_THREADS` is not used as one: it left the SFT's first losses bit-identical on the
machines measured, though the tiny CPT's losses differ between 1 and 2 threads from step 12 on.)

Paths:
    scratch   `python -m llada_train.sft +recipe=RECIPE` from a fresh model
    demo      the demo's path (scripts/demo.sh): `cpt +recipe=CPT_RECIPE` for 100 steps, then
              SFT from its last checkpoint (the CPT stage is perturbed and seeded the same way)

Usage:
    python scripts/robustness.py tiny --path scratch --out results/robustness/tiny_scratch
    python scripts/robustness.py tiny --path demo --out results/robustness/tiny_demo
    python scripts/robustness.py tiny --report-only --out results/robustness/tiny_scratch
Runs land in <out>/runs/ (not committed); the report is <out>/README.md and <out>/robustness.json.
Extra Hydra overrides after `--` go to every SFT run (e.g. `-- max_steps=600`).

A sweep may be split over machines and sessions (`--seeds 0` today, `--seeds 1 2` tomorrow, into
the same `--out`): a finished variant recorded in the committed <out>/robustness.json whose run
directory is gone (a fresh clone) is kept in the report and not run again (`--rerun` runs it
anyway). A recorded variant counts as finished only if it reached this sweep's `max_steps`.
Every variant records the CPU (`lscpu`'s model name) and the commit it ran on (`git describe
--always --dirty`), and the report lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llada_train.eval.evaluate import write_json  # noqa: E402
from llada_train.tracking import read_metrics  # noqa: E402

PERTURBATIONS = ("none", "split", "jitter")
COMMON = [
    "tracking=disabled",
    "progress=false",
    "checkpoint.smoke_prompts=0",
    "checkpoint.eval_every_saves=0",
]


def recipe_value(recipe: str, key: str, entry: str = "sft"):
    """A value of the composed recipe (Hydra compose, no run)."""
    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR
    from llada_train.config import register_configs

    register_configs(entry)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[f"+recipe={recipe}"])
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def perturbation_args(name: str, micro_batch_size: int) -> list[str]:
    if name == "none":
        return []
    if name == "split":
        if micro_batch_size < 2:
            raise ValueError("split needs micro_batch_size >= 2")
        return [f"micro_batch_size={micro_batch_size // 2}"]
    if name == "jitter":
        return ["init_jitter=1e-6"]
    raise ValueError(f"unknown perturbation {name!r}: choose from {PERTURBATIONS}")


def variant_commands(args, seed: int, pert: str) -> list[list[str]]:
    """The commands of one variant, in order (CPT first on the demo path)."""
    run_dir = os.path.join(args.out, "runs", f"seed{seed}_{pert}")
    cmds = []
    sft = [
        sys.executable, "-m", "llada_train.sft", f"+recipe={args.recipe}", f"seed={seed}",
        f"output_dir={run_dir}/sft", *COMMON,
        *perturbation_args(pert, recipe_value(args.recipe, "micro_batch_size")),
        f"heldout.num_questions={args.questions}",
    ]  # fmt: skip
    if args.path == "demo":
        cpt_micro = recipe_value(args.cpt_recipe, "micro_batch_size", "cpt")
        cmds.append([
            sys.executable, "-m", "llada_train.cpt", f"+recipe={args.cpt_recipe}",
            f"seed={seed}", f"output_dir={run_dir}/cpt", *COMMON,
            *perturbation_args(pert, cpt_micro),
        ])  # fmt: skip
        sft.append(f"init_from=@CPT:{run_dir}/cpt")
    cmds.append(sft + list(args.overrides))
    return cmds


def run_variant(cmds: list[list[str]], log_path: str) -> subprocess.Popen:
    """Start the variant's commands as one shell chain, logging to `log_path`."""
    parts = []
    for cmd in cmds:
        resolved = []
        for a in cmd:
            if a.startswith("init_from=@CPT:"):  # the CPT stage's last checkpoint, at run time
                cpt = a.split(":", 1)[1]
                a = f'init_from="$({sys.executable} -c "from llada_train.checkpoint import '
                a += f"resolve_model_dir as r; print(r('{cpt}'))\")\""
                resolved.append(a)
                continue
            resolved.append(subprocess.list2cmdline([a]))
        parts.append(" ".join(resolved))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    log = open(log_path, "w")
    return subprocess.Popen(
        " && ".join(parts), shell=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
    )


def load_record(out: str) -> dict:
    """The committed report's data (<out>/robustness.json), or {} when there is none."""
    path = os.path.join(out, "robustness.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def machine() -> dict[str, str]:
    """Where a variant runs: the CPU's model name (lscpu) and the repo's commit."""
    cpu = "unknown"
    try:
        env = {**os.environ, "LC_ALL": "C"}
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env=env).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "commit": commit or "unknown"}


def summarize(out: str, goal: float, max_steps: int | None = None) -> dict:
    """Per-variant figures from the runs' metrics.jsonl files. A variant whose last logged step
    is below `max_steps` is still running (or was stopped): it is listed, marked unfinished, and
    left out of the end and first-step figures. A variant of the committed <out>/robustness.json
    whose run directory is absent or empty (another machine ran it) is kept as recorded, marked
    `"recorded": true`, and counts as finished only if it reached `max_steps`."""
    runs_dir = os.path.join(out, "runs")
    variants = {}
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        if not os.path.isdir(os.path.join(runs_dir, name)):
            continue  # the variants' .log files and the per-variant maps (NAME.json)
        rows = read_metrics(os.path.join(runs_dir, name, "sft"))
        if not rows:
            continue  # nothing logged (yet): a recorded entry, if any, stands
        checks = [(m["step"], m["heldout/exact_match"]) for m in rows if "heldout/exact_match" in m]
        losses = [(m["step"], m["loss/total"]) for m in rows if "loss/total" in m]
        first = next((s for s, em in checks if em >= goal), None)
        variants[name] = {
            "checks": checks,
            "first_step_at_goal": first,
            "end": checks[-1][1] if checks else None,
            "end_step": checks[-1][0] if checks else None,
            "losses_first10": losses[:10],
            "last_step": rows[-1]["step"],
            "finished": max_steps is None or rows[-1]["step"] >= max_steps,
        }
    for name, v in load_record(out).get("variants", {}).items():
        if name not in variants:
            reached = max_steps is None or v.get("last_step", 0) >= max_steps
            variants[name] = {**v, "finished": bool(v.get("finished")) and reached,
                              "recorded": True}  # fmt: skip
    return dict(sorted(variants.items()))


def loss_differences(variants: dict) -> dict[str, float]:
    """Largest |loss| difference over the first 10 logged steps: each perturbation against the
    same seed's unperturbed run when there is one, else against the other perturbations."""
    out = {}
    for name, v in variants.items():
        seed, pert = name.split("_", 1)
        if pert == "none":
            continue
        base = variants.get(f"{seed}_none")
        others = [base] if base else [w for n, w in variants.items() if n.startswith(seed + "_")
                                      and n != name]  # fmt: skip
        diffs = [
            abs(a[1] - b[1])
            for other in others
            for a, b in zip(v["losses_first10"], other["losses_first10"], strict=False)
        ]
        out[name] = max(diffs) if diffs else float("nan")
    return out


def runs_json(out: str, name: str, recorded: set[str] = frozenset()) -> dict:
    """A per-variant map kept under <out>/runs/NAME.json (invocations, machines, wall_s): the
    local entry, except for the `recorded` variants (whose runs are gone), which take the
    committed record's entry."""
    merged = dict(load_record(out).get(name, {}))
    path = os.path.join(out, "runs", f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            merged.update({k: v for k, v in json.load(f).items() if k not in recorded})
    return merged


def update_runs_json(out: str, name: str, variant: str, value) -> None:
    path = os.path.join(out, "runs", f"{name}.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[variant] = value
    write_json(data, path)


def invocations(out: str, recorded: set[str] = frozenset()) -> list[str]:
    """The harness command lines that started the variants under `out` (in first-use order);
    for a record older than per-variant invocations, its `command`; else the current command."""
    lines = list(dict.fromkeys(runs_json(out, "invocations", recorded).values()))
    command = load_record(out).get("command")
    if not lines and command:
        lines = [" ".join(["python scripts/robustness.py", *command])]
    return lines or [" ".join(["python scripts/robustness.py", *sys.argv[1:]])]


def recorded_names(variants: dict) -> set[str]:
    return {n for n, v in variants.items() if v.get("recorded")}


def report(args, variants: dict, wall: dict, machines: dict | None = None) -> str:
    diffs = loss_differences(variants)
    steps = sorted({s for v in variants.values() for s, _ in v["checks"]})
    lines = [
        f"# Robustness: `{args.recipe}` ({args.path} path), seeds x perturbations",
        "",
        "Commands that ran the variants below:",
        "",
        *(f"    {c}" for c in invocations(args.out, recorded_names(variants))),
        "",
        f"Held-out exact match (first {args.questions} held-out chats, greedy, Quality preset) "
        f"at each check; goal >= {args.goal:g}.",
        "",
        "| variant | " + " | ".join(str(s) for s in steps) + f" | first step >= {args.goal} | "
        "end | loss diff vs. reference (first 10 steps) | wall min |",
        "|---" * (len(steps) + 5) + "|",
    ]
    for name, v in variants.items():
        by_step = dict(v["checks"])
        cells = [f"{by_step[s]:.3f}" if s in by_step else "-" for s in steps]
        diff = diffs.get(name)
        diff_s = "(reference)" if diff is None else f"{diff:.2e}"
        w = wall.get(name)
        end = "-" if v["end"] is None else f"{v['end']:.3f}"
        minutes = "-" if w is None else f"{w / 60:.1f}"
        first = v["first_step_at_goal"] or "never"
        if not v["finished"]:
            first, end = f"unfinished (step {v['last_step']})", "-"
        lines.append(f"| {name} | {' | '.join(cells)} | {first} | {end} | {diff_s} | {minutes} |")
    done = [v for v in variants.values() if v["finished"]]
    ends = [v["end"] for v in done if v["end"] is not None]
    firsts = [v["first_step_at_goal"] for v in done]
    if ends:
        lines += [
            "",
            f"End: min {min(ends):.3f}, max {max(ends):.3f}, mean {statistics.mean(ends):.3f} "
            f"over {len(ends)} variants.",
            f"First step >= {args.goal}: "
            + ", ".join(str(f) if f is not None else "never" for f in firsts)
            + (f" (latest {max(firsts)})" if all(f is not None for f in firsts) else ""),
        ]
    where: dict[tuple[str, str], list[str]] = {}
    for name in variants:
        m = (machines or {}).get(name)
        if m:
            where.setdefault((m["cpu"], m["commit"]), []).append(name)
    if where:
        lines += ["", "Where each variant ran (CPU as `lscpu` names it, commit):", ""]
        lines += [f"- {cpu}, {c}: {', '.join(names)}" for (cpu, c), names in where.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", help="SFT recipe name (recipes/NAME.yaml), e.g. tiny")
    p.add_argument("--path", choices=("scratch", "demo"), default="scratch")
    p.add_argument("--cpt-recipe", default="tiny", help="CPT recipe of the demo path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--perturbations", nargs="+", default=["split", "jitter"],
                   choices=PERTURBATIONS)  # fmt: skip
    p.add_argument("--questions", type=int, default=100, help="held-out chats per check")
    p.add_argument("--goal", type=float, default=0.9)
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one per core)")
    p.add_argument("--out", required=True)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--rerun", action="store_true",
                   help="run variants that robustness.json records as finished")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the SFT runs (after --)")
    args = p.parse_intermixed_args()  # overrides after `--` or right after the recipe

    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("max_steps=")]
    max_steps = int(given[-1]) if given else int(recipe_value(args.recipe, "max_steps"))
    if not args.report_only:
        before = summarize(args.out, args.goal, max_steps)
        queue = []
        for seed, pert in [(s, q) for s in args.seeds for q in args.perturbations]:
            name = f"seed{seed}_{pert}"
            v = before.get(name, {})
            if v.get("recorded") and v["finished"] and not args.rerun:
                print(f"kept {name} as recorded in {args.out}/robustness.json", flush=True)
            else:
                queue.append((seed, pert))
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        failed = []
        where = machine()
        while queue or running:
            while queue and len(running) < args.jobs:
                seed, pert = queue.pop(0)
                name = f"seed{seed}_{pert}"
                cmds = variant_commands(args, seed, pert)
                log = os.path.join(args.out, "runs", f"{name}.log")
                running[name] = (run_variant(cmds, log), time.time())
                command = " ".join(["python scripts/robustness.py", *sys.argv[1:]])
                update_runs_json(args.out, "invocations", name, command)
                update_runs_json(args.out, "machines", name, where)
                print(f"started {name}", flush=True)
            time.sleep(5)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    elapsed = time.time() - t0
                    update_runs_json(args.out, "wall_s", name, elapsed)
                    print(f"finished {name} (exit {proc.returncode}, {elapsed / 60:.1f} min)",
                          flush=True)  # fmt: skip
                    if proc.returncode:
                        failed.append(name)
                    del running[name]
        if failed:
            print(f"failed variants: {failed} (see their .log files)", file=sys.stderr)
    variants = summarize(args.out, args.goal, max_steps)
    recorded = recorded_names(variants)
    keys = ("wall_s", "invocations", "machines")
    record = {key: runs_json(args.out, key, recorded) for key in keys}
    text = report(args, variants, record["wall_s"], record["machines"])
    previous = load_record(args.out)
    command = previous.get("command") if args.report_only else None
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(text)
    # recorded variants are written back as they were recorded
    old = previous.get("variants", {})
    clean = {n: old[n] if n in recorded else v for n, v in variants.items()}
    write_json({"command": command or sys.argv[1:], "variants": clean, **record},
               os.path.join(args.out, "robustness.json"))  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
