"""Golden losses: fixed-seed tiny SFT, CPT and EBPO runs whose first steps are committed numbers.

A change that should not touch the math (a refactor, a new option that is off by default, a
faster kernel that is not the CPU default) must reproduce `tests/data/golden_losses.json`. When
a change alters the math on purpose, regenerate the file and say why in the commit:

    LLADA_GOLDEN_WRITE=1 python -m pytest tests/test_golden.py

The runs go through the real entry points (`python -m llada_train.{sft,cpt,rl}`) with every
setting that decides the numbers written out here, so tuning a shipped recipe does not move them.

Tolerances (`TOLERANCE`, issue 26): each compared figure gets one that float rounding of another
CPU cannot break but a change of the math does. The SFT/CPT losses and gradient norms are sums
of same-signed terms: 1e-5 relative (another CPU moved them by < 1e-6). The EBPO loss is not: at
an update's first step rho = 1 and the loss is -mean(A) with A summing to 0 per group, a
cancellation whose float32 residue is ~2e-9 absolute (seen: -1.67591e-05 against -1.67610e-05
on two CPUs, relative 1e-4, at the old lr 1e-5). So the EBPO run uses lr 1e-3 (ratios move by
~1e-2, well above rounding), its loss is compared to 5e-8 absolute (25x the 2e-9 that another
micro-batch split moved it) and the figure that pins the ELBO math is `elbo/mean`, the rollouts'
ELBO under theta_old: a sum of same-signed terms, compared to 1e-5 relative. Rewards, TPF and lr
are exact quantities (a flipped rollout token changes them, which is a change to catch).
`test_golden_tolerances_hold_under_rounding_and_fail_on_math` (slow) checks both halves: the
runs split into other micro-batches (other float reduction orders) pass; the same runs with the
learning rate changed by 1e-3 relative fail.

The EBPO run needs rewards that vary inside a group, which a random model never earns on the
shipped arithmetic. `constructed_policy` therefore rewrites a fresh tiny model so that its
next-token distribution is fixed whatever the context: {"1": 0.4, "2": 0.2, EOS: 0.4} (a
constant feature in every embedding, read out by the final norm and the head). Prompts ask for
"1", so a completion scores 1 iff it is "1" then EOS, and groups of 8 have mixed rewards.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from llada_train.tracking import read_metrics

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_losses.json")
WRITE = os.environ.get("LLADA_GOLDEN_WRITE") == "1"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

TRAIN = [
    "+recipe=tiny",
    "model.hidden_size=128",
    "model.intermediate_size=384",
    "model.moe_intermediate_size=64",
    "block_length=32",
    "seed=0",
    "micro_batch_size=2",
    "global_batch_size=4",
    "optim.lr=3e-3",
    "optim.weight_decay=0.01",
    "optim.warmup_ratio=0.05",
    "optim.min_lr_ratio=0.1",
    "optim.decay_ratio=1.0",  # pinned: the tiny recipe's schedule may change, the golden may not
    "optim.decay_end_ratio=1.0",
    "moe.bias_update_rate=1e-3",  # pinned as well (the tiny recipe turned it off, issue 26)
    "optim.betas=[0.9,0.999]",
    "heldout.every=0",
    "checkpoint.save_every=1000",
    "checkpoint.eval_every_saves=0",
    "tracking=disabled",
    "progress=false",
]
RL = [
    "conf=ebpo",
    "seed=0",
    "max_steps=4",
    "block_length=32",
    "rollout.prompts_per_step=2",
    "rollout.group_size=8",
    "rollout.gen_length=8",
    "rollout.temperature=1.0",
    "rollout.dual_mode_fraction=0.5",
    "micro_batch_size=8",
    "conf.num_levels=2",
    "conf.updates_per_batch=2",
    "conf.kl_coef=0.05",
    "optim.lr=1e-3",  # ratios move by ~1e-2, far above float32 rounding (module doc)
    "optim.warmup_ratio=0.0",
    "optim.weight_decay=0.0",
    "data.num_eval_prompts=4",
    "eval_every=100",
    "checkpoint.save_every=1000",
    "tracking=disabled",
    "progress=false",
]
KEYS = {
    "sft": ["loss/total", "loss/m2t", "loss/t2t", "loss/keep", "grad_norm", "lr"],
    "cpt": ["loss/total", "loss/m2t", "loss/t2t", "loss/keep", "grad_norm", "lr"],
    "ebpo": ["loss", "kl", "ratio/mean", "elbo/mean", "reward/mean", "rollout/tpf", "lr"],
}
# (relative, absolute) tolerance per figure (module doc); the default is the first entry
TOLERANCE = {
    "default": (1e-5, 1e-12),
    "ebpo/loss": (0.0, 5e-8),  # a cancellation of +-A: absolute, 25x the rounding seen
    "ebpo/ratio/mean": (0.0, 1e-6),  # 1 + O(1e-2); rounding of the log ratio ~1e-8
    "ebpo/kl": (1e-4, 1e-9),  # k3 of a difference of two ELBO sums (~1e-4)
    "ebpo/reward/mean": (0.0, 1e-12),
    "ebpo/rollout/tpf": (0.0, 1e-12),
}


def run(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=900
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}"


def constructed_policy(directory) -> None:
    """Turn the fresh model in `directory` into the fixed-distribution policy of the module doc."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    hidden = state["model.norm.weight"].numel()
    state["model.word_embeddings.weight"][:, 0] = 50.0  # dominates the residual stream's dim 0
    state["model.norm.weight"].zero_()
    state["model.norm.weight"][0] = 1.0  # the final hidden state is ~sqrt(hidden) * e_0
    head = torch.zeros_like(state["lm_head.weight"])
    head[:, 0] = -30.0 / math.sqrt(hidden)  # every other token: logit -30
    for token, p in {"1": 0.4, "2": 0.2, "<|endoftext|>": 0.4}.items():
        head[tokenizer.token_to_id(token), 0] = math.log(p) / math.sqrt(hidden)
    state["lm_head.weight"] = head
    save_file(state, path, metadata={"format": "pt"})


def say_one_setup(directory) -> tuple:
    """(policy dir, Hydra list of the prompt file) under `directory`: `constructed_policy` on a
    fresh tiny model (seed 0) and 8 prompts "Say 1, not i." whose math answer is 1."""
    policy = directory / "policy"
    run(["llada_train.model.init", "model=tiny", "seed=0", f"out={policy}"])
    constructed_policy(policy)
    prompts = directory / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Say 1, not {i}.", "answer": "1", "reward": "math"}) + "\n"
            for i in range(8)
        )
    )
    return policy, f"[{prompts}]"


def collect(run_dir, keys: list[str]) -> list[dict]:
    rows = [m for m in read_metrics(run_dir) if keys[0] in m]
    return [{"step": m["step"], **{k: m[k] for k in keys}} for m in rows]


def measure(tmp, train_extra=(), rl_extra=()) -> dict:
    """The three golden runs under `tmp`, with extra overrides; {name: [row per step]}."""
    # pinned: the tiny recipe's SFT corruption may change (CPT keeps its own U[eps, 1])
    sft = [*TRAIN, "corruption.t_min=0.3", "corruption.t_max=0.8", "corruption.pad_weight=1.0"]
    sft += train_extra
    run(["llada_train.sft", *sft, "max_steps=6", f"output_dir={tmp / 'sft'}"])
    # pinned: the text corpus (the tiny CPT recipe's corpus also holds the SFT chats)
    cpt = [*TRAIN, "data.train_files=[${repo:data/shipped/cpt.jsonl}]", *train_extra]
    run(["llada_train.cpt", *cpt, "max_steps=4", f"output_dir={tmp / 'cpt'}"])
    policy, files = say_one_setup(tmp)
    run(["llada_train.rl", *RL, *rl_extra, f"init_from={policy}", f"output_dir={tmp / 'rl'}",
         f"data.train_files={files}", f"data.eval_files={files}"])  # fmt: skip
    return {name: collect(tmp / name.replace("ebpo", "rl"), keys) for name, keys in KEYS.items()}


def mismatches(name: str, measured_rows: list[dict], golden_rows: list[dict]) -> list[str]:
    """Every (step, key) where a measured figure is outside its TOLERANCE of the golden one."""
    if [r["step"] for r in measured_rows] != [r["step"] for r in golden_rows]:
        return [f"{name}: steps {[r['step'] for r in measured_rows]}"]
    bad = []
    for got, want in zip(measured_rows, golden_rows, strict=True):
        for key in KEYS[name]:
            rel, abs_ = TOLERANCE.get(f"{name}/{key}", TOLERANCE["default"])
            if got[key] != pytest.approx(want[key], rel=rel, abs=abs_):
                bad.append(f"{name} step {got['step']} {key}: {got[key]!r} vs {want[key]!r}")
    return bad


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return measure(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("name", sorted(KEYS))
def test_golden_losses(measured, name):
    if WRITE:
        golden = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
        golden[name] = measured[name]
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")
    golden = json.load(open(GOLDEN))[name]
    assert not mismatches(name, measured[name], golden)
    if name == "ebpo":  # the run is only a useful golden if some group had mixed rewards
        assert any(row["reward/mean"] not in (0.0, 1.0) for row in golden)


@pytest.mark.slow
def test_golden_tolerances_hold_under_rounding_and_fail_on_math(tmp_path):
    """Both halves of the tolerance claim (module doc), each with real runs: the golden runs
    with every micro-batch split in two (SFT/CPT micro-batch 1 instead of 2, EBPO 4 instead of
    8: other gradient-sum orders, as another CPU's kernels give) still match; with the learning
    rate 1e-3 (relative) higher they do not, in every stage."""
    golden = json.load(open(GOLDEN))
    split = measure(tmp_path / "split", ["micro_batch_size=1"], ["micro_batch_size=4"])
    for name in KEYS:
        assert not mismatches(name, split[name], golden[name])
    changed = measure(tmp_path / "lr", ["optim.lr=3.003e-3"], ["optim.lr=1.001e-3"])
    for name in KEYS:
        assert mismatches(name, changed[name], golden[name]), name
