"""Expert parallelism through DeepSpeed AutoEP (issue 28 item 4), on CPU.

1 process: an AutoEP block built from our SparseMoE by the same path `create_engine` takes
(`prepare_for_autoep`, AutoEP's own detection and replacement with our `autoep_block` mapping,
`adapt_autoep_layers`) makes the same routing decisions (the chosen experts and their combine
weights) and gives the same outputs and gradients (input, router, every expert, shared expert)
as SparseMoE, in fp32, with a non-zero expert bias, for top-k with groups, top-1 (AutoEP would
normalise a single weight to 1, so route_norm is off there) and unnormalised weights without
groups. The bias travels as the frozen `e_score_correction_bias` parameter and is the tensor our
balancing rule updates; the HF export of the AutoEP model equals our model's, name for name.
Bad settings fail at launch with the key to change.

2 processes (gloo; DS_ACCELERATOR=cpu, started directly as in test_layerwise_rollout.py): a
tiny model trained 3 steps with EP=2 (each rank holds 4 of the 8 experts, tokens travel by
all_to_all_single) under ZeRO-0 and ZeRO-3 reproduces 1 process without EP on the same global
batch: losses, the expert biases moved by the aux-loss-free rule after every step, the HF
export in the official per-expert layout, and logits of the decoding twin.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_STEPS = 3
GLOBAL_BATCH, SEQ_LEN = 4, 8
BIAS_RATE = 1e-2
# case -> (ZeRO stage, AutoEP degree); "reference" is the 1-process run without EP
CASES_2PROC = {"ep2_zero0": (0, 2), "ep2_zero3": (3, 2)}


def small_config(**overrides):
    """8 experts in 4 groups, top-2 of 2 kept groups, a shared expert, one dense layer."""
    from llada_train.model.config import LLaDA2MoeConfig

    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_shared_experts=1,
        routed_scaling_factor=2.5, torch_dtype="float32",
    )  # fmt: skip
    base.update(overrides)
    return LLaDA2MoeConfig(**base)


def autoep_replace(model, ep_size: int = 1, ep_rank: int = 0) -> int:
    """`create_engine`'s AutoEP path without the engine: bias to parameter, AutoEP's detection
    and replacement with our mapping, then our adaptation. Returns the layers replaced."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    from llada_train.distributed import adapt_autoep_layers, autoep_block, prepare_for_autoep

    biases = prepare_for_autoep(model)
    block = {**autoep_block(model.config, "cpu"), "autoep_size": ep_size}
    auto_ep = AutoEP(model, parse_autoep_config(block))
    specs = auto_ep.ep_parser()
    auto_ep.replace_moe_layers(specs, ep_size=ep_size, ep_rank=ep_rank)
    return adapt_autoep_layers(model, biases)


def twin_models(config, seed: int = 0):
    """(ours, AutoEP-wrapped) with equal weights and a non-zero expert bias (N(0, 0.05))."""
    import copy

    from llada_train.model.modeling import LLaDA2MoeModelLM

    torch.manual_seed(seed)
    ours = LLaDA2MoeModelLM(config)
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.expert_bias.copy_(0.05 * torch.randn(config.num_experts))
    wrapped = copy.deepcopy(ours)
    assert autoep_replace(wrapped) == len(ours.moe_layers())
    return ours, wrapped


LAYER_CASES = {
    "groups_topk2": {},
    "top1": dict(num_experts_per_tok=1),
    "no_groups_unnormalised": dict(n_group=1, topk_group=1, norm_topk_prob=False),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_autoep_layer_equals_sparse_moe(case):
    """Routing decisions, outputs and gradients of the AutoEP block equal SparseMoE's (fp32)."""
    from llada_train.model.modeling import is_autoep_layer

    config = small_config(**LAYER_CASES[case])
    ours, wrapped = twin_models(config)
    moe, ep = ours.moe_layers()[0], wrapped.moe_layers()[0]
    assert is_autoep_layer(ep) and not is_autoep_layer(moe)
    x = torch.randn(3, 10, config.hidden_size)  # (B, L, H)

    # routing: the same experts per token, the same combine weights (AutoEP's top-k is unsorted)
    flat = x.reshape(-1, config.hidden_size)
    idx, w, _ = moe.gate(flat)
    w_ep, idx_ep, counts = ep.router(flat, ep.expert_bias)
    order, order_ep = idx.argsort(-1), idx_ep.argsort(-1)
    assert torch.equal(idx.gather(1, order), idx_ep.gather(1, order_ep))
    torch.testing.assert_close(w.gather(1, order), w_ep.gather(1, order_ep), rtol=1e-6, atol=1e-7)
    assert torch.equal(counts.long(), torch.bincount(idx.reshape(-1), minlength=8))
    # the bias was used: without it some token would choose differently
    assert not torch.equal(idx.sort(-1).values, _route_without_bias(moe, flat))

    # outputs and gradients
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = moe(xa), ep(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        moe.gate.weight.grad, ep.router.gate.weight.grad, rtol=1e-5, atol=1e-6
    )
    i = config.moe_intermediate_size
    gate_up, down = moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad  # (E,H,2I), (E,I,H)
    torch.testing.assert_close(
        gate_up[:, :, :i].transpose(1, 2), ep.experts.w1.grad, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        gate_up[:, :, i:].transpose(1, 2), ep.experts.w3.grad, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(down.transpose(1, 2), ep.experts.w2.grad, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(moe.shared_experts.named_parameters(),
                                 ep.shared_experts.named_parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ep.gate.expert_bias.grad is None  # frozen
    # the load the training loop reads
    assert torch.equal(ep.last_expert_load.long(), moe.last_expert_load)


def _route_without_bias(moe, flat):
    saved = moe.gate.expert_bias.clone()
    with torch.no_grad():
        moe.gate.expert_bias.zero_()
        idx = moe.gate(flat)[0].sort(-1).values
        moe.gate.expert_bias.copy_(saved)
    return idx


def test_autoep_bias_is_a_frozen_parameter_the_rule_updates():
    """The router bias travels as the frozen parameter `e_score_correction_bias`, `gate.expert_bias`
    is that same tensor, and the balancing rule's in-place update changes what AutoEP routes by."""
    from llada_train.train import update_expert_bias

    config = small_config()
    ours, wrapped = twin_models(config)
    for moe in wrapped.moe_layers():
        p = moe.router.e_score_correction_bias
        assert isinstance(p, torch.nn.Parameter) and not p.requires_grad
        assert moe.gate.expert_bias is p
    names = [n for n, _ in wrapped.named_parameters() if "e_score_correction_bias" in n]
    assert len(names) == len(ours.moe_layers())
    loads = torch.arange(len(ours.moe_layers()) * 8, dtype=torch.float32).view(-1, 8) % 5
    update_expert_bias(ours, loads, 0.1)
    update_expert_bias(wrapped, loads, 0.1)
    for a, b in zip(ours.moe_layers(), wrapped.moe_layers(), strict=True):
        assert torch.equal(a.gate.expert_bias, b.router.e_score_correction_bias)
    x = torch.randint(0, config.vocab_size, (2, 12))
    torch.testing.assert_close(ours(x), wrapped(x), rtol=1e-5, atol=1e-5)


def test_adapt_refuses_a_dropped_bias():
    """If AutoEP's router came without the bias, adaptation raises instead of routing unbiased."""
    from llada_train.distributed import adapt_autoep_layers

    config = small_config()
    _, wrapped = twin_models(config)
    biases = {n: m.router.e_score_correction_bias.detach().clone()
              for n, m in wrapped.named_modules() if hasattr(m, "router")}  # fmt: skip
    del wrapped.moe_layers()[0].router._parameters["e_score_correction_bias"]
    with pytest.raises(RuntimeError, match="dropped the expert bias"):
        adapt_autoep_layers(wrapped, biases)


def test_autoep_export_is_the_official_layout():
    """The HF export of the AutoEP model: the official names, shapes and values of ours."""
    from llada_train.model.io import official_shapes, official_state_dict

    config = small_config()
    ours, wrapped = twin_models(config)
    a = dict(official_state_dict(ours))
    b = dict(official_state_dict(wrapped))
    assert sorted(a) == sorted(b) == sorted(official_shapes(config))
    for name, t in a.items():
        assert torch.equal(t, b[name]), name
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in b
    assert "model.layers.1.mlp.gate.expert_bias" in b


def test_autoep_settings_fail_at_launch_naming_the_key(monkeypatch):
    """Incompatible settings: ValueError naming the key (load_balance_coeff, aux loss, LoRA,
    a routing key overridden, a degree not dividing the ranks, a negative degree)."""
    from omegaconf import OmegaConf

    from llada_train.config import DeepSpeedConfig, ExpertParallelConfig, OptimConfig
    from llada_train.distributed import check_deepspeed, check_expert_parallel, deepspeed_config

    def ds(size=2, overrides=None):
        return DeepSpeedConfig(stage=3, expert_parallel=ExpertParallelConfig(autoep_size=size),
                               overrides=overrides or {})  # fmt: skip

    with pytest.raises(ValueError, match=r"overrides\.expert_parallel\.load_balance_coeff"):
        check_deepspeed(ds(overrides={"expert_parallel": {"load_balance_coeff": 1e-3}}))
    with pytest.raises(ValueError, match=r"overrides\.expert_parallel\.score_func"):
        check_deepspeed(ds(overrides={"expert_parallel": {"score_func": "softmax"}}))
    with pytest.raises(ValueError, match=r"autoep_size=-1"):
        check_deepspeed(ds(size=-1))
    with pytest.raises(ValueError, match=r"AutoEP is off"):
        check_deepspeed(ds(size=0, overrides={"expert_parallel": {"comm_backend": "comm"}}))
    check_deepspeed(ds(overrides={"expert_parallel": {"comm_backend": "comm"}}))  # allowed
    with pytest.raises(ValueError, match=r"autoep_size=2 must divide the 3 ranks"):
        deepspeed_config(ds(), OptimConfig(), 1, 1, 3, "fp32")
    block = deepspeed_config(ds(), OptimConfig(), 1, 1, 4, "fp32")["expert_parallel"]
    assert block == {"enabled": True, "autoep_size": 2}

    monkeypatch.setenv("WORLD_SIZE", "4")
    run = OmegaConf.create(
        {
            "deepspeed": {"stage": 3, "expert_parallel": {"autoep_size": 2}},
            "moe": {"aux_loss_coef": 0.01},
            "lora": {"enabled": False},
        }
    )
    with pytest.raises(ValueError, match=r"moe\.aux_loss_coef"):
        check_expert_parallel(run)
    run.moe.aux_loss_coef = 0.0
    run.lora.enabled = True
    with pytest.raises(ValueError, match=r"lora\.enabled"):
        check_expert_parallel(run)
    run.lora.enabled = False
    check_expert_parallel(run)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"must divide the 3 ranks"):
        check_expert_parallel(run)


def test_layerwise_rollout_with_autoep_fails_at_config_check(monkeypatch):
    """`rollout.gather=layerwise` under AutoEP is refused by the RL launch checks
    (`check_rl_config` -> `check_run` -> `check_expert_parallel`), which run before any model
    is built, not at the first decode (`inference_model`); auto and whole pass."""
    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR
    from llada_train.config import register_configs
    from llada_train.distributed import check_expert_parallel
    from llada_train.rl.loop import check_rl_config

    monkeypatch.setenv("WORLD_SIZE", "8")
    register_configs("rl")

    def rl(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("rl", overrides=["init_from=null", "block_length=32",
                                            "deepspeed=zero3_ep", *overrides])  # fmt: skip

    cfg = rl("rollout.gather=layerwise")
    match = (
        r"rollout\.gather=layerwise with deepspeed\.expert_parallel\.autoep_size=8: .*"
        r"set rollout\.gather=auto or whole, or deepspeed\.expert_parallel\.autoep_size=0"
    )
    with pytest.raises(ValueError, match=match):
        check_rl_config(cfg, 8)
    with pytest.raises(ValueError, match=match):
        check_expert_parallel(cfg)
    for gather in ("auto", "whole"):
        check_rl_config(rl(f"rollout.gather={gather}"), 8)
    # without AutoEP layerwise passes the same checks
    check_rl_config(rl("rollout.gather=layerwise", "deepspeed.expert_parallel.autoep_size=0"), 8)


def test_zero3_ep_group_composes():
    """`deepspeed=zero3_ep` composes into the SFT config (ZeRO-3, AutoEP degree 8)."""
    from hydra import compose, initialize_config_dir

    from llada_train import CONF_DIR
    from llada_train.config import register_configs

    register_configs("train")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("sft", overrides=["deepspeed=zero3_ep",
                                        "deepspeed.expert_parallel.autoep_size=2"])  # fmt: skip
    assert cfg.deepspeed.stage == 3 and cfg.deepspeed.expert_parallel.autoep_size == 2


# ---------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out_dir, world: int, cases: list[str]) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }  # fmt: skip
        cmd = [sys.executable, __file__, str(out_dir), *cases]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-6000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_process_ep2_reproduces_one_process(tmp_path):
    """EP=2 over 2 processes (ZeRO-0 and ZeRO-3) = 1 process without EP: losses, expert
    biases after every step, the HF export, decoding-twin logits."""
    _run_ranks(tmp_path, 1, ["reference"])
    _run_ranks(tmp_path, 2, list(CASES_2PROC))
    with open(tmp_path / "reference.json") as f:
        ref = json.load(f)
    ref_export = torch.load(tmp_path / "reference.pt")
    for case in CASES_2PROC:
        with open(tmp_path / f"{case}.json") as f:
            got = json.load(f)
        assert got["num_autoep_layers"] == 2 and got["local_experts"] == 4, case
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=0, msg=case)
        # the routing agreed token for token: the integer loads, hence the biases, are equal
        assert got["loads"] == ref["loads"], case
        torch.testing.assert_close(got["biases"], ref["biases"], rtol=0, atol=1e-7, msg=case)
        export = torch.load(tmp_path / f"{case}.pt")
        assert sorted(export) == sorted(ref_export), case
        for name, t in ref_export.items():
            torch.testing.assert_close(export[name], t, rtol=1e-4, atol=2e-5, msg=f"{case} {name}")
        # per-position logit sums over the vocabulary: 1e-3 covers Adam-amplified rounding
        torch.testing.assert_close(got["twin_logits"], ref["twin_logits"], rtol=1e-3, atol=1e-3)
    assert ref["losses"][0] != ref["losses"][-1]  # it trained


def worker(out_dir: str, cases: list[str]) -> None:
    """One rank: for each case, a fresh engine over the seeded tiny model, NUM_STEPS optimizer
    steps on this rank's slice of the global batch, the aux-loss-free bias rule after each."""
    from llada_train.config import DeepSpeedConfig, ExpertParallelConfig, OptimConfig
    from llada_train.distributed import (
        all_reduce_sums,
        create_engine,
        deepspeed_config,
        inference_model,
        init_distributed,
        layerwise_gather,
    )  # fmt: skip
    from llada_train.losses import micro_batch_loss
    from llada_train.model.io import official_state_dict
    from llada_train.model.modeling import LLaDA2MoeModelLM
    from llada_train.train import update_expert_bias

    info = init_distributed()
    config = small_config()
    g = torch.Generator().manual_seed(123)
    x_all = torch.randint(0, config.vocab_size, (NUM_STEPS, GLOBAL_BATCH, SEQ_LEN), generator=g)
    y_all = torch.randint(0, config.vocab_size, (NUM_STEPS, GLOBAL_BATCH, SEQ_LEN), generator=g)
    per_rank = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    for case in cases:
        stage, ep = (0, 0) if case == "reference" else CASES_2PROC[case]
        torch.manual_seed(0)
        model = LLaDA2MoeModelLM(config)
        optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0)
        ds_cfg = DeepSpeedConfig(stage=stage, expert_parallel=ExpertParallelConfig(autoep_size=ep))
        ds = deepspeed_config(ds_cfg, optim, per_rank, 1, info.world_size, "fp32")
        engine = create_engine(model, ds, optim, NUM_STEPS)
        module = engine.module
        moe_layers = module.moe_layers()
        losses, biases, all_loads = [], [], []
        for step in range(NUM_STEPS):
            x, y = x_all[step, rows], y_all[step, rows]
            logits = engine(x)  # (B, L, V)
            local_sum = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )
            count = all_reduce_sums({"n": float(y.numel())}, info.device)["n"]
            engine.backward(micro_batch_loss(local_sum, count, info.world_size, 1))
            engine.step()
            loads = torch.stack([m.last_expert_load.float() for m in moe_layers])  # (layers, E)
            sums = all_reduce_sums({"loss": local_sum.detach(), "loads": loads}, info.device)
            update_expert_bias(module, sums["loads"].float(), BIAS_RATE)
            losses.append(float(sums["loss"] / count))
            all_loads.append(sums["loads"].long().tolist())
            biases.append([m.gate.expert_bias.detach().float().tolist() for m in moe_layers])
        gather = layerwise_gather(module)
        export = {
            n: t.detach().to("cpu", copy=True) for n, t in official_state_dict(module, gather)
        }
        module.eval()
        with inference_model(module, "whole", engine) as twin:
            twin_logits = twin(x_all[0, :1]).sum(-1).tolist()  # (1, L) per-position sums
        if info.is_main:
            local = [m for m in moe_layers if hasattr(m, "num_local_experts")]
            result = {
                "losses": losses, "biases": biases, "loads": all_loads,
                "twin_logits": twin_logits, "num_autoep_layers": len(local),
                "local_experts": local[0].num_local_experts if local else None,
            }  # fmt: skip
            with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
                json.dump(result, f)
            torch.save(export, os.path.join(out_dir, f"{case}.pt"))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))  # the checkout, as `python -m` from its root
    worker(sys.argv[1], sys.argv[2:])
