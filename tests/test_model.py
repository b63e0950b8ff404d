"""LLaDA2-MoE architecture: sizes, names, router, RoPE, masks, KV cache, MoE dispatch."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from llada_train import CONF_DIR
from llada_train.masks import block_causal_mask
from llada_train.model.config import OFFICIAL_DEFAULTS, LLaDA2MoeConfig
from llada_train.model.io import official_shapes, official_state_dict
from llada_train.model.modeling import (
    LLaDA2MoeModelLM,
    PrefixKVCache,
    Router,
    apply_partial_rope,
    grouped_mm,
    padded_bmm,
    per_group_mm,
    rope_cos_sin,
)
from llada_train.model.reference import naive_moe_forward
from tests.conftest import reference_config_path, tiny_config


# ---------------------------------------------------------------------------- config and sizes
@pytest.mark.parametrize("name", ["mini", "flash"])
def test_official_config_round_trips_unchanged(name, tmp_path):
    path = reference_config_path(name)
    original = json.load(open(path))
    config = LLaDA2MoeConfig.from_json(path)
    assert config.rope_dim == 64 and config.num_experts == 256
    config.to_json(tmp_path / "config.json")
    written = json.load(open(tmp_path / "config.json"))
    # Unchanged, plus use_qk_norm (the architecture's q/k RMSNorm) stated explicitly.
    assert written == {**original, "use_qk_norm": True}


def test_exported_config_has_every_official_key():
    """A config built from our YAML (no official file read) still writes every key of the
    official config.json, with the official value for the keys that are not architecture."""
    official = json.load(open(reference_config_path("mini")))
    written = tiny_config().to_dict()
    assert set(official) | {"use_qk_norm"} == set(written) - {"eos_token_id", "mask_token_id"}
    for key in OFFICIAL_DEFAULTS:
        if key in official:
            assert written[key] == official[key], key
    assert written["rotary_dim"] == tiny_config().rope_dim and written["use_qk_norm"] is True
    assert LLaDA2MoeConfig.from_dict(written).to_dict() == written  # and it reads back as is


@pytest.mark.parametrize("name", ["mini", "flash"])
def test_hydra_model_yaml_matches_official_config(name):
    yaml = OmegaConf.to_container(OmegaConf.load(f"{CONF_DIR}/model/{name}.yaml"))
    official = json.load(open(reference_config_path(name)))
    for key, value in yaml.items():
        if key in official:
            assert official[key] == value, key
    ours = LLaDA2MoeConfig.from_dict(yaml, strict=True)
    assert official_shapes(ours) == official_shapes(
        LLaDA2MoeConfig.from_json(reference_config_path(name))
    )


@pytest.mark.parametrize("name, total_b, active_b", [("mini", 16.26, 1.43), ("flash", 103.0, 6.1)])
def test_parameter_counts_on_meta_device(name, total_b, active_b):
    config = LLaDA2MoeConfig.from_json(reference_config_path(name))
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    frac = config.num_experts_per_tok / config.num_experts
    active = total - expert_params + expert_params * frac
    assert abs(total / 1e9 - total_b) / total_b < 0.01, total
    assert abs(active / 1e9 - active_b) / active_b < 0.01, active
    assert (total, int(active)) == config.num_parameters()


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="n_group"):
        tiny_config(n_group=3)
    with pytest.raises(ValueError, match="unknown model config key.*hiden_size"):
        LLaDA2MoeConfig.from_dict({"hiden_size": 4}, strict=True)
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 10,\n  oops\n}')
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 3"):
        LLaDA2MoeConfig.from_json(tmp_path)


# ---------------------------------------------------------------------------- names
OFFICIAL_NAME = re.compile(
    r"^(lm_head\.weight|model\.word_embeddings\.weight|model\.norm\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.attention\.(query_key_value|query_layernorm|key_layernorm|dense)\.weight|"
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.mlp\.gate\.(weight|expert_bias)|"
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight)$"
)


def test_mini_state_dict_uses_official_names_and_shapes():
    config = LLaDA2MoeConfig.from_json(reference_config_path("mini"))
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    ours = {name: tuple(t.shape) for name, t in official_state_dict(model)}
    assert all(OFFICIAL_NAME.match(n) for n in ours), [
        n for n in ours if not OFFICIAL_NAME.match(n)
    ][:5]
    assert ours == official_shapes(config)
    # spot checks against the official layout
    assert ours["model.layers.0.mlp.gate_proj.weight"] == (5120, 2048)  # layer 0 is dense
    assert ours["model.layers.1.mlp.experts.255.down_proj.weight"] == (2048, 512)
    assert ours["model.layers.19.attention.query_key_value.weight"] == ((16 + 2 * 4) * 128, 2048)
    assert ours["model.layers.5.mlp.gate.expert_bias"] == (256,)
    assert len(ours) == 3 + 20 * 6 + 3 + 19 * (2 + 256 * 3 + 3)


# ---------------------------------------------------------------------------- router
def _router(bias=None) -> Router:
    """8 experts in 4 groups of 2, keep 2 groups, top-2, scale 2.5; weight = identity so the
    router logits equal the input."""
    config = tiny_config(
        hidden_size=8, num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2
    )
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))
        if bias is not None:
            router.expert_bias.copy_(torch.tensor(bias))
    return router


SCORES = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.6, 0.65, 0.2, 0.3])


def test_router_group_limited_selection_and_scaled_weights():
    # group sums of top-2: g0 = 0.9+0.1 = 1.0, g1 = 1.5, g2 = 1.25, g3 = 0.5 -> keep g1, g2.
    # Expert 0 has the best score (0.9) but its group is dropped. Top-2 of {2,3,4,5}: 2 and 3.
    # Weights: 0.8 / 1.5 * 2.5 = 4/3 and 0.7 / 1.5 * 2.5 = 7/6.
    idx, w, scores = _router()(torch.logit(SCORES)[None])
    assert sorted(idx[0].tolist()) == [2, 3]
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert got[2] == pytest.approx(4 / 3, abs=1e-6) and got[3] == pytest.approx(7 / 6, abs=1e-6)
    assert torch.allclose(scores[0], SCORES, atol=1e-6)


def test_expert_bias_changes_selection_not_weights():
    # bias +0.2 on expert 5: biased g2 = 0.6 + 0.85 = 1.45 (still kept with g1 = 1.5); top-2
    # biased among {2: .8, 3: .7, 4: .6, 5: .85} -> 5 and 2. Weights use the UNBIASED scores:
    # 0.65 / 1.45 * 2.5 and 0.8 / 1.45 * 2.5.
    idx, w, _ = _router(bias=[0, 0, 0, 0, 0, 0.2, 0, 0])(torch.logit(SCORES)[None])
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert sorted(got) == [2, 5]
    assert got[5] == pytest.approx(0.65 / 1.45 * 2.5, abs=1e-6)
    assert got[2] == pytest.approx(0.8 / 1.45 * 2.5, abs=1e-6)
    assert sum(got.values()) == pytest.approx(2.5, abs=1e-6)  # normalised, then scaled


def test_router_runs_in_fp32_for_bf16_inputs():
    router = _router().to(torch.bfloat16)
    _, w, scores = router(torch.logit(SCORES)[None].to(torch.bfloat16))
    assert w.dtype == torch.float32 and scores.dtype == torch.float32


# ---------------------------------------------------------------------------- rope
def test_partial_rope_hand_case():
    # head_dim 4, rotary dim 2: inv_freq = [1], so at position p the first two dims rotate by
    # angle p ([a, b] -> [a cos p - b sin p, b cos p + a sin p]) and dims 2, 3 pass through.
    cos, sin = rope_cos_sin(
        torch.tensor([[0, 1, 2]]), rope_dim=2, theta=600000.0, dtype=torch.float32
    )
    x = torch.tensor([1.0, 0.0, 5.0, 7.0]).expand(1, 1, 3, 4)  # (B, heads, L, D)
    y = apply_partial_rope(x, cos, sin)
    for p in range(3):
        expected = torch.tensor([math.cos(p), math.sin(p), 5.0, 7.0])
        assert torch.allclose(y[0, 0, p], expected, atol=1e-6)
    # 4 rotary dims: frequencies 1 and theta^(-1/2), rotate_half pairs dim i with i + 2
    cos, sin = rope_cos_sin(torch.tensor([[3]]), rope_dim=4, theta=100.0, dtype=torch.float32)
    assert torch.allclose(cos[0, 0], torch.tensor([math.cos(3), math.cos(0.3)] * 2), atol=1e-6)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0, 9.0, 9.0])[None, None, None]
    y = apply_partial_rope(x, cos, sin)
    assert torch.allclose(
        y[0, 0, 0], torch.tensor([math.cos(3), 0, math.sin(3), 0, 9, 9]), atol=1e-6
    )


# ---------------------------------------------------------------------------- masks and cache
def test_block_causal_property(tiny_model):
    block, n = 8, 32
    ids = torch.randint(0, 90, (2, n))
    pos = torch.arange(n)[None]
    mask = block_causal_mask(pos, pos, block)
    with torch.no_grad():
        ref = tiny_model(ids, attention_mask=mask)
        changed = ids.clone()
        changed[:, 2 * block :] = torch.randint(0, 90, (2, n - 2 * block))
        out = tiny_model(changed, attention_mask=mask)
    assert torch.allclose(out[:, : 2 * block], ref[:, : 2 * block], atol=1e-6)
    assert not torch.allclose(out[:, 2 * block :], ref[:, 2 * block :], atol=1e-3)
    # inside a block attention is bidirectional: changing the last token of block 1 moves
    # the logits of the first token of block 1
    changed = ids.clone()
    changed[:, 2 * block - 1] = (changed[:, 2 * block - 1] + 1) % 90
    with torch.no_grad():
        out = tiny_model(changed, attention_mask=mask)
    assert not torch.allclose(out[:, block], ref[:, block], atol=1e-4)


def test_prefix_cache_forward_equals_full_forward(tiny_model):
    block, n = 8, 32
    ids = torch.randint(0, 90, (2, n))
    pos = torch.arange(n)[None]
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=block_causal_mask(pos, pos, block))
        cache = PrefixKVCache.empty(tiny_model.config.num_hidden_layers)
        # commit blocks 0-1 in one forward, then block 2 alone, then decode block 3 from cache
        q = pos[:, : 2 * block]
        first = tiny_model(
            ids[:, : 2 * block], block_causal_mask(q, q, block), q, cache, commit_len=2 * block
        )
        q2 = pos[:, 2 * block : 3 * block]
        k2 = pos[:, : 3 * block]
        tiny_model(
            ids[:, 2 * block : 3 * block],
            block_causal_mask(q2, k2, block),
            q2,
            cache,
            commit_len=block,
        )
        assert cache.length == 3 * block
        q3, k3 = pos[:, 3 * block :], pos
        last = tiny_model(ids[:, 3 * block :], block_causal_mask(q3, k3, block), q3, cache)
    assert cache.length == 3 * block  # commit_len 0 leaves the cache unchanged
    assert torch.allclose(first, full[:, : 2 * block], atol=1e-5)
    assert torch.allclose(last, full[:, 3 * block :], atol=1e-5)


def test_padding_keys_are_ignored(tiny_model):
    """A left-padded row gives the logits of the unpadded row (padding cut by key_valid)."""
    ids = torch.randint(0, 90, (1, 16))
    pad = torch.zeros(1, 8, dtype=torch.long)
    pos = torch.arange(16)[None]
    with torch.no_grad():
        ref = tiny_model(ids, block_causal_mask(pos, pos, 8), pos)
        padded_pos = torch.cat((torch.zeros(1, 8, dtype=torch.long), pos), 1)
        valid = torch.cat(
            (torch.zeros(1, 8, dtype=torch.bool), torch.ones(1, 16, dtype=torch.bool)), 1
        )
        mask = block_causal_mask(padded_pos, padded_pos, 8, key_valid=valid)
        mask = mask | torch.eye(24, dtype=torch.bool)  # padding queries see themselves (no NaN)
        out = tiny_model(torch.cat((pad, ids), 1), mask, padded_pos)
    assert torch.allclose(out[:, 8:], ref, atol=1e-5)


# ---------------------------------------------------------------------------- MoE dispatch
def test_grouped_moe_equals_per_expert_loop():
    torch.manual_seed(1)
    model = LLaDA2MoeModelLM(tiny_config(num_hidden_layers=2)).train()
    moe = model.model.layers[1].mlp
    x = torch.randn(3, 10, 32, requires_grad=True)
    ours = moe(x)
    ref = naive_moe_forward(moe, x)
    assert torch.allclose(ours, ref, atol=1e-5)
    g = torch.randn_like(ours)
    (gx_ours, gw_ours) = torch.autograd.grad(ours, (x, moe.experts.gate_up_proj), g)
    (gx_ref, gw_ref) = torch.autograd.grad(ref, (x, moe.experts.gate_up_proj), g)
    assert torch.allclose(gx_ours, gx_ref, atol=1e-5) and torch.allclose(gw_ours, gw_ref, atol=1e-5)
    assert moe.last_expert_load.sum() == 30 * 2  # tokens x top-k


@pytest.mark.parametrize("impl", [grouped_mm, per_group_mm, padded_bmm])
def test_grouped_mm_paths_match_including_empty_groups(impl):
    """The CPU path (per group), the GPU fallback (padded bmm) and the dispatcher agree."""
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([2, 2, 6, 7])  # group 1 is empty
    out = impl(x, w, offsets)
    ref = torch.cat((x[0:2] @ w[0], x[2:6] @ w[2], x[6:7] @ w[3]))
    assert torch.allclose(out, ref)
    g_out = torch.autograd.grad(out.square().sum(), (x, w))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, w))
    assert all(torch.allclose(a, b) for a, b in zip(g_out, g_ref, strict=True))
    assert impl(x[:0], w, torch.zeros(4, dtype=torch.long)).shape == (0, 3)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(2)
    model = LLaDA2MoeModelLM(tiny_config()).train()
    ids = torch.randint(0, 90, (2, 16))
    grads = []
    for use_ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = use_ckpt
        model(ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_init_jitter_is_a_rounding_sized_seeded_perturbation():
    from llada_train.model.build import build_model

    ds = {"zero_optimization": {"stage": 0}}
    base = build_model(tiny_config(), ds, init_from=None, seed=0, is_main=True)
    jit = build_model(tiny_config(), ds, init_from=None, seed=0, is_main=True, init_jitter=1e-6)
    again = build_model(tiny_config(), ds, init_from=None, seed=0, is_main=True, init_jitter=1e-6)
    changed = 0
    for (name, p), q, r in zip(
        base.named_parameters(), jit.parameters(), again.parameters(), strict=True
    ):
        assert torch.equal(q, r), name  # seeded: the same jitter every time
        rel = ((q - p).abs() / p.abs().clamp_min(1e-30)).max()
        assert rel < 1e-5, name  # 1e-6 N(0, 1): a few 1e-6 at most
        changed += int(not torch.equal(p, q))
    assert changed == len(list(base.parameters()))  # every tensor moved
