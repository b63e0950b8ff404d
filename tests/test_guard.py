"""Runs that never train on garbage: the non-finite guard (SFT/CPT and RL) and resume under a
changed config (the schedule recomputed; data / global batch / seed / model changes refused).
Real entry points on CPU; outcomes read from metrics.jsonl, stderr and the checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llada_train.checkpoint import COMPLETE, complete_checkpoints
from llada_train.model.io import from_pretrained
from llada_train.tracking import read_metrics
from tests import test_golden as golden
from tests.test_train import run_entry


def exports(run_dir) -> dict[int, dict[str, torch.Tensor]]:
    root = os.path.join(run_dir, "checkpoints")
    return {
        step: from_pretrained(os.path.join(path, "hf")).state_dict()
        for step, path in complete_checkpoints(root)
    }


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_run_stops_nonzero_and_never_saves_nan(tmp_path, stage):
    """optim.lr=1e10: step 1 is applied (huge but finite weights), then every gradient is
    non-finite; those steps change nothing, are counted, and the third in a row stops the run
    with `step 4: non-finite ...` and exit status 2. ZeRO-0 runs our guard, ZeRO-2 DeepSpeed's."""
    out = tmp_path / "run"
    proc = run_entry("sft", out, "optim.lr=1e10", "max_steps=8", "checkpoint.save_every=1",
                     "checkpoint.keep_last=0", "max_consecutive_nonfinite=3",
                     f"deepspeed=zero{stage}", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 4: non-finite loss"), last
    assert "Traceback" not in proc.stderr
    metrics = read_metrics(out)
    assert [m["nonfinite/steps"] for m in metrics] == [0, 1, 2, 3]
    saved = exports(out)
    assert sorted(saved) == [1, 2, 3]  # the stopping step saves nothing
    for step, state in saved.items():
        for name, t in state.items():
            assert torch.isfinite(t).all(), (step, name)
    for step in (2, 3):  # a non-finite step makes no parameter and no expert-bias update
        for name, t in saved[1].items():
            assert torch.equal(saved[step][name], t), (step, name)


def test_nan_rl_run_stops_nonzero_and_never_saves_nan(tmp_path):
    """EBPO with optim.lr=1e10 on the golden test's constructed policy (groups with mixed
    rewards, so the objective has a gradient): the first update is applied, the second one's
    gradient is not finite, is skipped, and (limit 1) stops the run with `step 1: non-finite
    ...` and exit status 2, before any checkpoint."""
    policy = tmp_path / "policy"
    golden.run(["llada_train.model.init", "model=tiny", "seed=0", f"out={policy}"])
    golden.constructed_policy(policy)
    prompts = tmp_path / "prompts.jsonl"
    record = {"answer": "1", "reward": "math"}
    prompts.write_text("".join(json.dumps({"prompt": f"Say 1, not {i}.", **record}) + "\n"
                               for i in range(8)))  # fmt: skip
    out = tmp_path / "rl"
    cmd = [sys.executable, "-m", "llada_train.rl", *golden.RL, f"init_from={policy}",
           f"output_dir={out}", f"data.train_files=[{prompts}]", "data.eval_files=[]",
           "optim.lr=1e10", "max_steps=8", "checkpoint.save_every=1", "checkpoint.keep_last=0",
           "max_consecutive_nonfinite=1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=golden.ENV, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 1: non-finite loss"), last
    assert "warning: step 1: non-finite" in proc.stdout  # counted and reported first
    assert exports(out) == {}  # nothing saved after the huge first update


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run_entry("sft", out, "max_steps=6", "checkpoint.save_every=3", "checkpoint.smoke_prompts=0")
    return out


def test_resumed_run_takes_the_new_schedule_at_once(uninterrupted, tmp_path):
    """Trained for 3 of 3 steps, then resumed with max_steps=6: the first resumed update uses
    the 6-step schedule's lr at step 4 (the 3-step schedule had reached its final value)."""
    out = tmp_path / "run"
    common = ("checkpoint.save_every=3", "checkpoint.smoke_prompts=0")
    run_entry("sft", out, "max_steps=3", *common)
    first = read_metrics(out)[-1]["lr"]  # the old schedule's next value: its final one
    run_entry("sft", out, "max_steps=6", *common)
    want = {m["step"]: m["lr/applied"] for m in read_metrics(uninterrupted)}
    got = {m["step"]: m["lr/applied"] for m in read_metrics(out)}
    assert got[4] == pytest.approx(want[4], rel=1e-12) and got[4] != pytest.approx(first)
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-12)


def test_resume_refuses_changed_fixed_keys(uninterrupted, tmp_path):
    out = tmp_path / "run"
    common = ("checkpoint.save_every=3", "checkpoint.smoke_prompts=0")
    run_entry("sft", out, "max_steps=3", *common)
    with open(os.path.join(out, "checkpoints", "step_00000003", COMPLETE)) as f:
        fixed = json.load(f)["fixed"]
    assert set(fixed) == {"data", "global_batch_size", "seed", "model"} and fixed["seed"] == 0
    proc = run_entry("sft", out, "max_steps=6", "seed=1", "global_batch_size=8", *common,
                     check=False)  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: resume from ") and "seed: 0 -> 1" in last
    assert "global_batch_size: 4 -> 8" in last and "resume_allow_changes=true" in last
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]  # nothing ran
    run_entry("sft", out, "max_steps=4", "seed=1", "resume_allow_changes=true", *common)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
