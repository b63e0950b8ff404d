"""LoRA (peft) SFT end to end on CPU: learning, exact resume, adapter-only checkpoints, merged
export equal to base + adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from llada_train.lora import apply_lora, lora_parameter_count, trainable_parameters
from llada_train.model.io import from_pretrained
from llada_train.tracking import read_metrics

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
LORA = [
    "+recipe=tiny", "lora.enabled=true", "lora.r=8", "optim.lr=1e-2", "max_steps=6",
    "micro_batch_size=4", "global_batch_size=8", "checkpoint.save_every=3",
    "checkpoint.eval_every_saves=0", "checkpoint.smoke_prompts=1",
    "checkpoint.smoke_gen_length=8", "tracking=disabled", "progress=false",
]  # fmt: skip


def run(*args: str, env: dict | None = None, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env={**ENV, **(env or {})},
        timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    run("llada_train.model.init", "model=tiny", f"out={out}")
    return out


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = run("llada_train.sft", *LORA, f"init_from={base}", f"output_dir={out}")
    return out, proc.stdout


def losses(run_dir) -> list[float]:
    return [m["loss/total"] for m in read_metrics(run_dir)]


def test_lora_run_learns_and_trains_only_adapters(lora_run):
    out, stdout = lora_run
    values = losses(out)
    assert len(values) == 6 and values[-1] < 0.8 * values[0], values
    assert "trained by LoRA" in stdout
    ckpt = os.path.join(out, "checkpoints", "step_00000006")
    state = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)
    names = list(state["module"])
    # adapter-only: the adapters and the (tiny) expert-bias buffers, no frozen base weight
    assert names and all(".lora_" in n or n.endswith("expert_bias") for n in names)


def test_sigkill_then_resume_equals_uninterrupted(base, lora_run, tmp_path):
    out = tmp_path / "run"
    args = [*LORA, f"init_from={base}", f"output_dir={out}"]
    proc = run(
        "llada_train.sft", *args, env={"LLADA_TRAIN_FAULT": "kill_after_step:4"}, check=False
    )
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-2000:]
    run("llada_train.sft", *args, "resume=auto")
    assert losses(out) == losses(lora_run[0])  # bit-identical, steps 4-6 recomputed


def test_merged_export_equals_base_plus_adapter(base, lora_run):
    """The HF export of step 6 is a plain model whose logits equal those of the base model with
    the saved adapter applied (fp32, atol 1e-5)."""
    out, _ = lora_run
    ckpt = os.path.join(out, "checkpoints", "step_00000006")
    merged = from_pretrained(os.path.join(ckpt, "hf")).eval()
    lora_model = apply_lora(
        from_pretrained(base), _settings(r=8)
    ).eval()  # the run's settings: r 8, alpha 32, default targets
    state = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)
    missing, unexpected = lora_model.load_state_dict(state["module"], strict=False)
    assert not unexpected and all(".lora_" not in n for n in missing)
    for moe, b in zip(lora_model.moe_layers(), state["expert_bias"], strict=True):
        moe.gate.expert_bias.copy_(torch.tensor(b))  # the load-balance bias moved during training
    ids = torch.randint(5, 700, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lora_model(ids)
        got = merged(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, from_pretrained(base).eval()(ids), atol=1e-3)


def test_adapter_count_from_the_config_matches_peft():
    from conftest import tiny_config

    from llada_train.model.modeling import LLaDA2MoeModelLM

    settings = _settings(r=4)
    model = apply_lora(LLaDA2MoeModelLM(tiny_config()), settings)
    assert trainable_parameters(model) == lora_parameter_count(tiny_config(), settings)


def _settings(**kw):
    from llada_train.lora import LoraSettings

    return LoraSettings(enabled=True, **kw)


def test_cpt_and_rl_take_lora_too(base, tmp_path):
    """The CPT entry and the EBPO loop train adapters only, save adapter-only checkpoints and
    export merged models that load; the first EBPO ratio is 1 (theta = theta_old at step 1)."""
    cpt = tmp_path / "cpt"
    run("llada_train.cpt", *LORA, "max_steps=2", "checkpoint.save_every=2", f"init_from={base}",
        f"output_dir={cpt}")  # fmt: skip
    assert len(losses(cpt)) == 2
    rl = tmp_path / "rl"
    run(
        "llada_train.rl", "conf=ebpo", f"init_from={base}", f"output_dir={rl}", "lora.enabled=true",
        "lora.r=4", "max_steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "micro_batch_size=4", "rollout.gen_length=16", "data.num_eval_prompts=4", "eval_every=2",
        "checkpoint.save_every=2", "tracking=disabled", "progress=false",
    )  # fmt: skip
    train = [m for m in read_metrics(rl) if "ratio/mean" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert train[0]["ratio/mean"] == pytest.approx(1.0, abs=0.05)
    for run_dir in (cpt, rl):
        ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
        state = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)
        assert all(".lora_" in n or n.endswith("expert_bias") for n in state["module"])
        from_pretrained(os.path.join(ckpt, "hf"))  # the merged export is a plain model
