"""Building the model of a run: its config (from a `model` node or a checkpoint) and its weights.

Contract:
- `model_config_from_node(node, tokenizer)`: a Hydra `model` node (strict: an unknown key is a
  typo and fails) plus the tokenizer's special ids -> `LLaDA2MoeConfig`; the config's
  vocab_size must cover the tokenizer.
- `resolve_model_config(init_from, node, tokenizer)`: `init_from`'s config.json when given, else
  the node.
- `build_model(config, ds_config, init_from=..., seed=..., is_main=...)`: a fresh model (seeded,
  identical on every rank) or one loaded from `init_from`. Under ZeRO-3 with `init_from`,
  parameters are created partitioned (`zero.Init`) and filled one decoder layer at a time (rank 0
  reads, the others receive their partitions; buffers are broadcast from rank 0 afterwards).
Used by the init command, the CPT/SFT loop and the RL loop.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from llada_train.distributed import broadcast_buffers, layerwise_gather
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.io import load_official_weights
from llada_train.model.modeling import LLaDA2MoeModelLM


def model_config_from_node(node: Any, tokenizer=None) -> LLaDA2MoeConfig:
    """A Hydra `model` node (strict: unknown keys are typos) + optional tokenizer -> config.

    Raises ValueError when model.vocab_size is smaller than the tokenizer."""
    d = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    if tokenizer is not None:
        from llada_train.tokenizer import special_ids

        ids = special_ids(tokenizer)
        if len(tokenizer) > d["vocab_size"]:
            raise ValueError(
                f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens); raise model.vocab_size"
            )
        d.update(eos_token_id=ids.eos_id, pad_token_id=ids.pad_id, mask_token_id=ids.mask_id)
    return LLaDA2MoeConfig.from_dict(d, strict=True)


def resolve_model_config(init_from: str | None, node: Any, tokenizer=None) -> LLaDA2MoeConfig:
    """The model config: init_from's config.json, else the `model` node (+ tokenizer ids)."""
    if init_from:
        return LLaDA2MoeConfig.from_json(init_from)
    return model_config_from_node(node, tokenizer)


def build_model(
    config: LLaDA2MoeConfig,
    ds_config: dict[str, Any],
    *,
    init_from: str | None,
    seed: int,
    is_main: bool,
    init_jitter: float = 0.0,
) -> LLaDA2MoeModelLM:
    """Fresh (seeded with `seed`) or loaded from `init_from` (module docstring).

    init_jitter > 0 multiplies every parameter by (1 + init_jitter * N(0, 1)) (a generator
    seeded with `seed`): a perturbation of the float rounding of a run, as another CPU's kernels
    give, for robustness checks (scripts/robustness.py); 0 leaves the weights untouched.
    """
    model = _build(config, ds_config, init_from=init_from, seed=seed, is_main=is_main)
    if init_jitter:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError("init_jitter is not supported with ZeRO-3 partitioned loading")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + init_jitter * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _build(config, ds_config, *, init_from, seed, is_main) -> LLaDA2MoeModelLM:
    if init_from and ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LLaDA2MoeModelLM(config)
        gather = layerwise_gather(model, modifier_rank=0)
        load_official_weights(model, init_from, gather=gather, write=is_main)
        broadcast_buffers(model)
        return model
    torch.manual_seed(seed)
    if init_from:
        with torch.device("meta"):
            model = LLaDA2MoeModelLM(config)
        model = model.to_empty(device="cpu")
        load_official_weights(model, init_from)
        return model
    return LLaDA2MoeModelLM(config)
