"""The memory plan (llada_train/memory_plan.py): model-state arithmetic by hand, and the
activation formula against the bytes autograd really saves for a forward of the tiny model on
CPU at two sizes (within 15%)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from llada_train.masks import training_inputs
from llada_train.memory_plan import (
    GB,
    Setup,
    activation_bytes,
    attention_mask_bytes,
    estimate,
    format_plan,
    main,
    model_state_bytes,
    parameter_groups,
    saved_logits_bytes,
)
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.modeling import LLaDA2MoeModelLM

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "reference")


def saved_bytes(model, input_ids, mask, positions, logits_slice, targets, supervised):
    """Bytes of the distinct storages autograd saves for backward during forward + loss,
    parameters and buffers excluded; also the dispatch padding of the CPU grouped matmul."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids, attention_mask=mask, position_ids=positions,
                       logits_slice=logits_slice)  # fmt: skip
        idx = supervised.nonzero(as_tuple=True)
        loss = F.cross_entropy(logits[idx].float(), targets[idx], reduction="sum")
    loss.backward()
    pads = []
    for moe in model.moe_layers():
        load = moe.last_expert_load
        pads.append(moe.num_experts * int(load.max()) / int(load.sum()))  # (E x cap) / (T x K)
    return sum(seen.values()), sum(pads) / len(pads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,seq_len", [(2, 64), (4, 128)])
def test_activation_formula_matches_saved_tensors(rows, seq_len, dtype):
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=3, vocab_size=128)  # fmt: skip
    model = LLaDA2MoeModelLM(config).to(dtype).train()
    model.attention_backend = "sdpa"
    block = 16
    x0 = torch.randint(0, 100, (rows, seq_len))
    xt = torch.where(torch.rand(rows, seq_len) < 0.5, 101, x0)
    input_ids, mask, positions, sl = training_inputs(xt, x0, block)
    supervised = xt == 101
    measured, padding = saved_bytes(model, input_ids, mask, positions, sl, x0, supervised)
    a = 2 if dtype == torch.bfloat16 else 4
    share = supervised.float().mean().item()
    formula = (
        activation_bytes(config, rows, seq_len, block, a, dispatch_padding=padding)
        + attention_mask_bytes(config, 1, 2 * seq_len)
        + saved_logits_bytes(config, rows, seq_len, 2 * seq_len, a, share)
    )
    print(f"rows {rows} L {seq_len} {dtype}: measured {measured / 1e6:.3f} MB, "
          f"formula {formula / 1e6:.3f} MB, ratio {formula / measured:.3f}")  # fmt: skip
    assert abs(formula - measured) <= 0.15 * measured


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    config = tiny_config()
    full = activation_bytes(config, 2, 64, 16, 2)
    ckpt = activation_bytes(config, 2, 64, 16, 2, checkpointing=True)
    # 3 layers: inputs 3 x (2 x 128 x 32 x 2 B) = 49152 B plus one (the MoE) layer
    layer_inputs = 3 * 2 * 128 * 32 * 2
    assert ckpt - layer_inputs < full / 2
    assert ckpt > layer_inputs


def test_model_states_follow_the_zero_rules():
    config = tiny_config()
    total, expert, _ = parameter_groups(config)
    assert total == config.num_parameters()[0]
    base = Setup(task="sft", num_gpus=8, gpu_gb=80, stage=0, offload_optimizer=False,
                 offload_param=False, lora_params=0, ep_size=1, micro_batch_size=1,
                 seq_len=64, block_length=32, activation_checkpointing=False)  # fmt: skip
    states = {k: model_state_bytes(config, dataclasses.replace(base, stage=k))[0]
              for k in range(4)}  # fmt: skip
    assert states[0] == pytest.approx(16 * total)
    assert states[1] == pytest.approx(4 * total + 12 * total / 8)  # 12 B partitioned
    assert states[2] == pytest.approx(2 * total + 14 * total / 8)  # grads too
    assert states[3] == pytest.approx(16 * total / 8)  # weights too
    gpu, host = model_state_bytes(
        config, dataclasses.replace(base, stage=3, offload_optimizer=True, offload_param=True)
    )
    assert gpu == pytest.approx(2 * total / 8) and host == pytest.approx(14 * total / 8)
    # EP 8 on 8 GPUs under ZeRO-1: experts split 8 ways, no data parallel left for them
    ep = model_state_bytes(config, dataclasses.replace(base, stage=1, ep_size=8))[0]
    dense = total - expert
    assert ep == pytest.approx(4 * dense + 12 * dense / 8 + 16 * expert / 8)
    # LoRA: frozen base holds 2 B, adapters 16 B
    lora = model_state_bytes(config, dataclasses.replace(base, lora_params=1000))[0]
    assert lora == pytest.approx(2 * total + 16 * 1000)


def test_mini_plan_has_the_verdict_line():
    config = LLaDA2MoeConfig.from_json(os.path.join(REFERENCE, "llada2_mini_config.json"))
    s = Setup(task="sft", num_gpus=8, gpu_gb=80, stage=3, offload_optimizer=False,
              offload_param=False, lora_params=0, ep_size=1, micro_batch_size=1,
              seq_len=4096, block_length=32, activation_checkpointing=True)  # fmt: skip
    states_gb = 16 * config.num_parameters()[0] / 8 / GB
    assert estimate(config, s).states_gb == pytest.approx(states_gb)  # ~32.5 GB
    lines = format_plan(config, s)
    assert lines[-1].startswith("memory plan: peak ") and lines[-1].endswith(": fits")
    small = format_plan(config, dataclasses.replace(s, gpu_gb=24))
    assert small[-1].endswith("does not fit") and "what to change:" in small


def test_mini_sft_dry_run_prints_the_plan_for_the_world_size():
    env = {**os.environ, "WORLD_SIZE": "8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.sft", "+recipe=mini", "dry_run=true", "plan.gpu_gb=80"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"memory plan: peak [\d.]+ GB per GPU on 8 x 80 GB: fits", last), last


def test_rl_plan_of_flash_says_what_to_change(capsys):
    main(["rl", "model=flash", "deepspeed=zero3", "plan.num_gpus=8", "plan.gpu_gb=80"])
    out = capsys.readouterr().out
    assert "rollout extra (whole gather + KV cache)" in out
    assert "what to change:" in out and "deepspeed=zero3_offload" in out
    assert out.strip().splitlines()[-1].endswith("on 8 x 80 GB: does not fit")
