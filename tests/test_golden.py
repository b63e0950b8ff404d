"""Golden losses: fixed-seed tiny SFT, CPT and EBPO runs whose first steps are committed numbers.

A change that should not touch the math (a refactor, a new option that is off by default, a
faster kernel that is not the CPU default) must reproduce `tests/data/golden_losses.json`. When
a change alters the math on purpose, regenerate the file and say why in the commit:

    LLADA_GOLDEN_WRITE=1 python -m pytest tests/test_golden.py

The runs go through the real entry points (`python -m llada_train.{sft,cpt,rl}`) with every
setting that decides the numbers written out here, so tuning a shipped recipe does not move them.
Tolerance: 1e-5 relative (values are float32 computations; on one machine they repeat bit for
bit, the slack only covers another CPU's kernels), 1e-12 absolute (some EBPO losses are ~1e-7).

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
    "optim.lr=1e-5",
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
    "ebpo": ["loss", "kl", "ratio/mean", "reward/mean", "rollout/tpf", "lr"],
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


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("golden")
    # pinned: the tiny recipe's SFT mask ratio may change (CPT keeps its own U[eps, 1])
    sft = [*TRAIN, "corruption.t_min=0.3"]
    run(["llada_train.sft", *sft, "max_steps=6", f"output_dir={tmp / 'sft'}"])
    run(["llada_train.cpt", *TRAIN, "max_steps=4", f"output_dir={tmp / 'cpt'}"])
    policy, files = say_one_setup(tmp)
    run(["llada_train.rl", *RL, f"init_from={policy}", f"output_dir={tmp / 'rl'}",
         f"data.train_files={files}", f"data.eval_files={files}"])  # fmt: skip
    return {name: collect(tmp / name.replace("ebpo", "rl"), keys) for name, keys in KEYS.items()}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_golden_losses(measured, name):
    if WRITE:
        golden = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
        golden[name] = measured[name]
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")
    golden = json.load(open(GOLDEN))[name]
    assert [row["step"] for row in measured[name]] == [row["step"] for row in golden]
    for got, want in zip(measured[name], golden, strict=True):
        for key in KEYS[name]:
            expected = pytest.approx(want[key], rel=1e-5, abs=1e-12)
            assert got[key] == expected, (name, got["step"], key)
    if name == "ebpo":  # the run is only a useful golden if some group had mixed rewards
        assert any(row["reward/mean"] not in (0.0, 1.0) for row in golden)
