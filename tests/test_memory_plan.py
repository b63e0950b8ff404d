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
    parameters and buffers excluded. The CPU grouped matmul runs one matmul per expert
    (`modeling.per_group_mm`), so there is no dispatch padding to account for."""
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
    return sum(seen.values())


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
    measured = saved_bytes(model, input_ids, mask, positions, sl, x0, supervised)
    a = 2 if dtype == torch.bfloat16 else 4
    share = supervised.float().mean().item()
    formula = (
        activation_bytes(config, rows, seq_len, block, a)
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
    # host: bf16 weights 2 B + optimizer 12 B + the fp32 gradient partition 4 B (stage3.py)
    assert gpu == pytest.approx(2 * total / 8) and host == pytest.approx(18 * total / 8)
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
    main(["rl", "model=flash", "deepspeed=zero3", "rollout.gather=whole", "plan.num_gpus=8",
          "plan.gpu_gb=80"])  # fmt: skip
    out = capsys.readouterr().out
    assert "rollout (whole: whole model + KV cache + logits)" in out
    assert "what to change:" in out and "deepspeed=zero3_offload" in out
    assert "layerwise rollout gather (rollout.gather=layerwise)" in out
    assert out.strip().splitlines()[-1].endswith("on 8 x 80 GB: does not fit")


def test_suggestions_under_expert_parallelism():
    """ep_size > 1: LoRA is never suggested (launch refuses LoRA with AutoEP,
    `distributed.check_expert_parallel`); an RL rollout that decodes on a whole copy (AutoEP
    refuses layerwise decoding) gets "no expert parallelism", alone and with
    `deepspeed=zero3_offload`, each evaluated with the layerwise rollout `auto` would pick."""
    config = LLaDA2MoeConfig.from_json(os.path.join(REFERENCE, "llada2_mini_config.json"))
    s = Setup(task="rl", num_gpus=8, gpu_gb=40, stage=3, offload_optimizer=False,
              offload_param=False, lora_params=0, ep_size=8, micro_batch_size=8, seq_len=320,
              block_length=32, activation_checkpointing=True, rollout_batch=8, rollout_len=320,
              rollout_gather="whole")  # fmt: skip
    lines = format_plan(config, s, total_lora_params=10**8)
    assert lines[-1].endswith("on 8 x 40 GB: does not fit")
    assert not any("lora" in line.lower() for line in lines)
    no_ep = ("no expert parallelism (deepspeed.expert_parallel.autoep_size=0; "
             "rollout.gather=auto then decodes layerwise)")  # fmt: skip
    alone = estimate(config, dataclasses.replace(s, ep_size=1, rollout_gather="layerwise"))
    assert f"  {no_ep}: peak {alone.peak_gb:.1f} GB (does not fit)" in lines  # 46.1 GB
    offload = dict(stage=3, offload_optimizer=True, offload_param=True)
    both = estimate(config, dataclasses.replace(s, ep_size=1, rollout_gather="layerwise",
                                                **offload))  # fmt: skip
    assert both.fits
    assert (f"  deepspeed=zero3_offload, {no_ep}: peak {both.peak_gb:.1f} GB "
            f"(fits; host {both.host_gb:.0f} GB per GPU)") in lines  # fmt: skip
    kept = estimate(config, dataclasses.replace(s, **offload))  # EP kept: the whole copy stays
    assert not kept.fits and kept.rollout_gb > 2 * config.num_parameters()[0] / GB
    assert any(line.startswith("  deepspeed=zero3_offload deepspeed.expert_parallel.autoep_size=8"
                               f" (rollouts still decode on a whole copy): peak {kept.peak_gb:.1f}")
               for line in lines)  # fmt: skip
    # the same plan without EP suggests LoRA and no "no expert parallelism"
    plain = format_plan(config, dataclasses.replace(s, ep_size=1), total_lora_params=10**8)
    assert any("lora.enabled=true deepspeed=zero2" in line for line in plain)
    assert not any("expert parallelism" in line for line in plain)


def test_rl_plan_of_flash_under_autoep_suggests_dropping_it(capsys):
    """`deepspeed=zero3_ep` (AutoEP 8): rollouts decode on a whole copy (206 GB), which fits no
    GPU; without EP `auto` decodes layerwise and the plan fits (77.0 GB, as docs/memory.md's
    'flash RL, no recipe' row on 32 GPUs). No LoRA line."""
    main(["rl", "model=flash", "deepspeed=zero3_ep", "activation_checkpointing=true",
          "plan.num_gpus=32", "plan.gpu_gb=80", "rollout.prompts_per_step=32"])  # fmt: skip
    out = capsys.readouterr().out
    assert "rollout.gather=auto -> whole" in out
    assert ("  no expert parallelism (deepspeed.expert_parallel.autoep_size=0; rollout.gather=auto "
            "then decodes layerwise): peak 77.0 GB (fits)") in out  # fmt: skip
    assert "lora" not in out.lower()
    assert out.strip().splitlines()[-1].endswith("on 32 x 80 GB: does not fit")


# (entry, recipe, GPUs, peak GB, host GB per GPU): the flash recipes' plans, docs/memory.md's table
FLASH_RECIPES = [
    ("sft", "flash", 8, 56.9, 231.5),  # one node: ZeRO-3, optimizer + parameters offloaded
    ("sft", "flash_multinode", 32, 44.1, 51.4),  # 4 nodes: optimizer offloaded only
    ("rl", "flash", 8, 44.2, 231.5),
    ("rl", "flash", 32, 24.4, 57.9),
]


@pytest.mark.parametrize("entry, recipe, num_gpus, peak, host", FLASH_RECIPES)
def test_flash_recipes_fit_the_nodes_they_are_for(capsys, entry, recipe, num_gpus, peak, host):
    main([entry, f"+recipe={recipe}", f"plan.num_gpus={num_gpus}", "plan.gpu_gb=80"])
    out = capsys.readouterr().out
    assert f"host memory (offload): {host:.1f} GB per GPU" in out
    last = out.strip().splitlines()[-1]
    assert last == f"memory plan: peak {peak:.1f} GB per GPU on {num_gpus} x 80 GB: fits", last


def test_auto_gather_is_whole_where_the_whole_model_fits():
    """rollout.gather=auto: mini's whole bf16 model (32.5 GB) fits beside its ZeRO-3 states on
    8 x 80 GB, flash's (206 GB) fits no GPU; below ZeRO-3 nothing is gathered; a launched run
    on the CPU always decodes whole (no GPU memory to plan for)."""
    from llada_train.config import register_configs
    from llada_train.memory_plan import decode_gather, rl_model_config, setup_from_config

    register_configs("rl")
    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR

    def rl(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="rl", overrides=["plan.gpu_gb=80", *overrides])
        return cfg, rl_model_config(cfg)

    cfg, mini = rl("plan.model=mini", "deepspeed=zero3", "activation_checkpointing=true")
    assert setup_from_config(cfg, mini, "rl", 8).rollout_gather == "whole"
    assert decode_gather(cfg, mini, "rl", 8, "cuda")[0] == "whole"
    assert decode_gather(cfg, mini, "rl", 8, "cpu") == ("whole", "rollout.gather=auto on the cpu")
    cfg, flash = rl("plan.model=flash", "deepspeed=zero3")
    assert setup_from_config(cfg, flash, "rl", 32).rollout_gather == "layerwise"
    gather, why = decode_gather(cfg, flash, "rl", 32, "cuda")
    assert gather == "layerwise" and why.startswith("rollout.gather=auto: "), why
    assert "205.8 GB in bf16) + KV cache = " in why and "does not fit in 80 GB" in why, why
    # a launched run passes the smallest GPU of its ranks: 40 GB is too small for mini's whole
    cfg, mini = rl("plan.model=mini", "deepspeed=zero3")
    assert decode_gather(cfg, mini, "rl", 8, "cuda", gpu_gb=40.0)[0] == "layerwise"
    cfg, flash = rl("plan.model=flash", "deepspeed=zero2")
    assert setup_from_config(cfg, flash, "rl", 32).rollout_gather == "whole"  # resident
    cfg, flash = rl("plan.model=flash", "deepspeed=zero3", "rollout.gather=whole")
    assert decode_gather(cfg, flash, "rl", 32, "cuda") == ("whole", "rollout.gather=whole")


def test_auto_gather_ignores_training_activations():
    """Training and decoding are never live together: mini SFT on 8 x 80 GB without
    activation checkpointing (a training plan that does not fit) still decodes whole, because
    model states (32.5 GB) + the whole model (32.5 GB) + one block's KV cache and logits + 3 GB
    fit in 80 GB. SFT has no gather key: the reason names none."""
    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR
    from llada_train.config import register_configs
    from llada_train.memory_plan import decode_gather, setup_from_config, whole_gather_peak_gb
    from llada_train.model.build import resolve_model_config

    register_configs("train")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="sft", overrides=["+recipe=mini", "plan.gpu_gb=80",
                                                     "activation_checkpointing=false"])  # fmt: skip
    config = resolve_model_config(cfg.init_from, cfg.model)
    s = setup_from_config(cfg, config, "sft", 8)
    assert not estimate(config, s).fits  # the training plan does not fit without checkpointing
    assert s.rollout_gather == "whole"
    states_gb = 16 * config.num_parameters()[0] / 8 / GB
    kv = 1 * 32 * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2
    logits = 2 * 1 * 32 * config.vocab_size * 4
    expected = states_gb + (2 * config.num_parameters()[0] + kv + logits) / GB + 3.0
    assert whole_gather_peak_gb(config, s) == pytest.approx(expected)  # ~68.4 GB
    gather, why = decode_gather(cfg, config, "sft", 8, "cuda")
    assert gather == "whole" and why.startswith("auto: model states + the whole model"), why
    assert "=" not in why.split(":")[0] and "decoding=" not in why  # no key SFT cannot set
    assert decode_gather(cfg, config, "sft", 8, "cpu") == ("whole", "auto on the cpu")


def test_layerwise_rollout_counts_the_working_set_once():
    """Training and decoding are not live together: peak = states + max(working set +
    activations + logits, rollout), and a layerwise rollout's weights are that working set."""
    config = LLaDA2MoeConfig.from_json(os.path.join(REFERENCE, "llada2_mini_config.json"))
    s = Setup(task="rl", num_gpus=8, gpu_gb=80, stage=3, offload_optimizer=False,
              offload_param=False, lora_params=0, ep_size=1, micro_batch_size=8, seq_len=320,
              block_length=32, activation_checkpointing=True, rollout_batch=8, rollout_len=320,
              rollout_gather="layerwise")  # fmt: skip
    _, _, largest = parameter_groups(config)
    working = 2 * 2 * largest  # bf16 weights of the current and the prefetched module
    # KV cache: 8 x 320 positions x 20 layers x (K, V) x 4 heads x 128 x 2 B; one block's fp32
    # logits twice: 2 x 8 x 32 x 157184 x 4 B
    kv = 8 * 320 * 20 * 2 * 4 * 128 * 2
    logits = 2 * 8 * 32 * 157184 * 4
    p = estimate(config, s)
    assert p.rollout_gb == pytest.approx((working + kv + logits) / GB)
    whole = estimate(config, dataclasses.replace(s, rollout_gather="whole"))
    assert whole.rollout_gb == pytest.approx((2 * config.num_parameters()[0] + kv + logits) / GB)
    assert whole.peak_gb == pytest.approx(whole.states_gb + whole.rollout_gb + 3.0)
    assert p.peak_gb == pytest.approx(p.states_gb + max(working / GB + p.activations_gb,
                                                        p.rollout_gb) + 3.0)  # fmt: skip


def test_rl_dry_run_of_the_flash_recipe_prints_the_plan():
    """`python -m llada_train.rl conf=ebpo +recipe=flash dry_run=true`: no init_from, no
    weights (flash in fp32 would be 412 GB; the model is built on the meta device), the
    layerwise rollout chosen by auto, and the verdict line last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.rl", "conf=ebpo", "+recipe=flash", "dry_run=true",
         "plan.num_gpus=8", "plan.gpu_gb=80"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[dry run] rl: model built on the meta device" in out
    assert "rollout.gather=auto -> layerwise" in out
    assert '"stage3_prefetch_bucket_size": 3300000000' in out  # the recipe's nested override
    assert '"stage": 3' in out  # ... merged into, not replacing, the zero_optimization block
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"memory plan: peak [\d.]+ GB per GPU on 8 x 80 GB: fits", last), last
