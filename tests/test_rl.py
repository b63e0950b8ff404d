"""The RL entry point end to end on CPU: the literal command, metrics, resume, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llada_train.checkpoint import complete_checkpoints
from llada_train.tracking import read_metrics

SMALL = [
    "max_steps=2",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "micro_batch_size=4",
    "rollout.gen_length=16",
    "data.num_eval_prompts=4",
    "eval_every=2",
    "checkpoint.save_every=1",
    "tracking=disabled",
    "progress=false",
]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A fresh tiny model in HF format (the RL loop only needs an init_from directory)."""
    out = tmp_path_factory.mktemp("policy") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "llada_train.model.init", "model=tiny", f"out={out}"],
        check=True, capture_output=True, env=ENV, timeout=300,
    )  # fmt: skip
    return out


def run_rl(out, policy_dir, *extra, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "llada_train.rl", "conf=ebpo"]
    else:
        port = str(30500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, "-m", "llada_train.rl", "conf=ebpo"]  # fmt: skip
    cmd += [f"init_from={policy_dir}", f"output_dir={out}", *SMALL, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_literal_command_runs_and_logs(policy_dir, tmp_path):
    out = tmp_path / "rl"
    run_rl(out, policy_dir)
    metrics = read_metrics(out)
    train = [m for m in metrics if "reward/mean" in m]
    evals = [m for m in metrics if "eval/reward" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert [m["step"] for m in evals] == [0, 2]
    for key in ("reward/math", "reward/std", "advantage/abs_mean", "ratio/mean", "clip_fraction",
                "zero_variance_groups", "response_length/mean", "rollout/tpf", "rollout/time_s",
                "time/elbo_old_s", "time/update_s", "rollout/rounds", "update/signal_groups",
                "update/dual_groups"):  # fmt: skip
        assert key in train[0], key
    # first update of every batch starts at theta_old with the same noise: ratio exactly 1 there;
    # with 2 updates per batch the mean over both can only move after the first step
    assert train[0]["ratio/mean"] == pytest.approx(1.0, abs=0.05)
    assert [s for s, _ in complete_checkpoints(os.path.join(out, "checkpoints"))][-1] == 2
    assert os.path.exists(os.path.join(out, "rollouts.jsonl"))  # the table of sample completions


def test_grpo_baseline_and_resume(policy_dir, tmp_path):
    out = tmp_path / "rl"
    run_rl(out, policy_dir, "conf=grpo", "max_steps=1")
    run_rl(out, policy_dir, "conf=grpo", "max_steps=2")  # resume=auto from step 1
    steps = [m["step"] for m in read_metrics(out) if "reward/mean" in m]
    assert steps == [1, 2]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes(policy_dir, tmp_path, stage):
    """2 ranks, each with its own prompts; under ZeRO-3 the policy is loaded partitioned."""
    out = tmp_path / "rl"
    run_rl(out, policy_dir, f"deepspeed=zero{stage}", nproc=2)
    train = [m for m in read_metrics(out) if "reward/mean" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert train[0]["ratio/mean"] == pytest.approx(1.0, abs=0.05)
    assert [s for s, _ in complete_checkpoints(os.path.join(out, "checkpoints"))][-1] == 2


def test_bad_config_is_explained(policy_dir, tmp_path):
    proc = run_rl(
        tmp_path / "rl", policy_dir, "rollout.prompts_per_step=3", "micro_batch_size=5", check=False
    )
    assert proc.returncode != 0 and "must be a multiple of micro_batch_size=5" in proc.stderr
    proc = run_rl(tmp_path / "rl", policy_dir, "rollout.max_rounds=0", check=False)
    assert proc.returncode != 0 and "rollout.max_rounds=0 must be >= 1" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.rl", "conf=ebpo", f"init_from={tmp_path}/nothing"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "not a model directory" in proc.stderr


def test_checkpoint_options_are_honoured(policy_dir, tmp_path):
    """The RL loop saves through the same run set-up as SFT/CPT: export dtype, smoke generation
    and log_every mean the same here."""
    out = tmp_path / "rl"
    run_rl(
        out, policy_dir, "checkpoint.save_every=2", "checkpoint.export_dtype=bfloat16",
        "checkpoint.smoke_prompts=1", "checkpoint.smoke_gen_length=8", "tracking.log_every=2",
        "rollout.gen_length=8", "eval_every=100",
    )  # fmt: skip
    assert [m["step"] for m in read_metrics(out) if "reward/mean" in m] == [2]  # step 1 not logged
    (ckpt,) = [path for _, path in complete_checkpoints(os.path.join(out, "checkpoints"))]
    with open(os.path.join(ckpt, "smoke_generation.json")) as f:
        assert len(json.load(f)["samples"]) == 1
    with open(os.path.join(ckpt, "hf", "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_rl_from_a_mask_only_model_warns_and_keeps_its_fact(policy_dir, tmp_path):
    """A policy whose facts say t2t_trained false (a mask-only SFT export): RL decodes its
    dual-mode rollouts and held-out reward with T2T editing, so it warns, and its own exports
    keep the fact (RL trains masked positions only)."""
    import shutil

    from llada_train.model.io import load_training_facts, save_training_facts

    policy = tmp_path / "mask_only_policy"
    shutil.copytree(policy_dir, policy)
    save_training_facts(str(policy), {"block_length": 32, "t2t_trained": False})
    out = tmp_path / "rl"
    proc = run_rl(out, policy, "max_steps=1", "eval_every=1")
    assert "trained without T2T supervision" in proc.stderr
    export = os.path.join(complete_checkpoints(os.path.join(out, "checkpoints"))[-1][1], "hf")
    assert load_training_facts(export)["t2t_trained"] is False
    # editing off: nothing to warn about
    proc = run_rl(tmp_path / "rl_m2t", policy, "max_steps=1", "eval_every=1",
                  "sampler.editing_threshold=null")  # fmt: skip
    assert "trained without T2T supervision" not in proc.stderr


def test_dynamic_sampling_trains_on_groups_with_signal(tmp_path):
    """rollout.max_rounds > 1 (DAPO dynamic sampling): rounds of fresh prompts until every kept
    group has reward variance, at most max_rounds; a resumed run repeats the uninterrupted one.
    The policy is test_golden's fixed-distribution one, whose groups have mixed rewards about 3
    times in 4, so some batches need a second round."""
    from tests.test_golden import say_one_setup

    policy, files = say_one_setup(tmp_path)
    args = ["rollout.max_rounds=3", "rollout.group_size=8", "rollout.prompts_per_step=2",
            "micro_batch_size=8", "rollout.gen_length=8", "conf.num_levels=2",
            "optim.min_lr_ratio=1.0",  # a constant lr: stopping at step 2 is then no change
            f"data.train_files={files}", f"data.eval_files={files}", "eval_every=100"]  # fmt: skip
    whole = tmp_path / "whole"
    run_rl(whole, policy, *args, "max_steps=4")
    train = [m for m in read_metrics(whole) if "reward/mean" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        assert 1 <= m["rollout/rounds"] <= 3
        if m["rollout/rounds"] < 3:  # it stopped early: the batch is full of signal
            assert m["update/signal_groups"] == 1.0
    assert any(m["rollout/rounds"] > 1 for m in train)  # these seeds do need a second round
    # resumed at step 2: the same rounds, rewards and losses
    resumed = tmp_path / "resumed"
    run_rl(resumed, policy, *args, "max_steps=2")
    run_rl(resumed, policy, *args, "max_steps=4")
    again = [m for m in read_metrics(resumed) if "reward/mean" in m]
    for key in ("rollout/rounds", "reward/mean", "loss", "zero_variance_groups"):
        assert [m[key] for m in again] == [m[key] for m in train], key
