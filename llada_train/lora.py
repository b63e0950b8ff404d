"""LoRA fine-tuning of LLaDA2-MoE with HF `peft` (adapters, adapter-only state, merged export).

Contract:
- `apply_lora(model, cfg)` wraps the model in a `peft.PeftModel` with LoRA (r, alpha, dropout)
  on `cfg.target_modules`, default every attention projection (`attention.query_key_value`,
  `attention.dense`) and every dense MLP: the dense first layers' `mlp.{gate,up,down}_proj` and
  the MoE layers' shared expert `mlp.shared_experts.{gate,up,down}_proj`. Everything else is
  frozen: embeddings, norms, router, `lm_head`, and the **routed experts**, which are stored
  stacked as (E, ...) parameters (`StackedExperts`), not as nn.Linear modules, so LoRA's module
  adapters do not apply to them; training them would need per-expert adapters on the stacked
  tensors (peft's `target_parameters`), which we do not offer yet. The aux-loss-free
  `expert_bias` buffers keep following the load rule and travel in the checkpoint's client state.
- `trainable_parameters(model)` counts what the optimizer sees; `lora_parameter_count(config,
  cfg)` computes it from the config alone (dry runs of mini/flash, no weights).
- `merged_official_state(model, gather)` yields (official name, tensor) of base + adapter:
  W = W0 + (alpha / r) * B @ A for every adapted Linear (peft's own `get_delta_weight`), the
  other weights unchanged, computed out of place (training weights untouched). The HF export of
  a LoRA run is therefore an ordinary full checkpoint in the official layout.
- Checkpoints of a LoRA run hold the adapter and its optimizer state only (DeepSpeed's
  `exclude_frozen_parameters`); resume rebuilds the base from `init_from` and loads them.
- ZeRO-3 is refused: adapters on partitioned weights are not supported here (use ZeRO-0/2,
  which LoRA makes affordable: the frozen base needs no gradient or optimizer state).

Source: Hu et al., LoRA (arXiv 2106.09685), W = W0 + (alpha / r) B A with B = 0 at init.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# Suffixes of the nn.Linear modules that get adapters (peft matches module names by suffix).
DEFAULT_TARGETS = ["query_key_value", "dense", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """The `lora` node of the CPT/SFT/RL configs."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def check_lora(cfg, zero_stage: int) -> None:
    """Bad LoRA settings fail at launch: ValueError naming the key."""
    if not cfg.enabled:
        return
    if cfg.r < 1:
        raise ValueError(f"lora.r must be >= 1, got {cfg.r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    unknown = sorted(set(cfg.target_modules) - set(DEFAULT_TARGETS))
    if unknown or not cfg.target_modules:
        raise ValueError(
            f"lora.target_modules: {unknown or 'empty'}; choose among {DEFAULT_TARGETS} (the "
            "nn.Linear modules; routed experts are stacked tensors and stay frozen)"
        )
    if zero_stage == 3:
        raise ValueError("lora.enabled=true needs deepspeed=zero0, zero1 or zero2 (not ZeRO-3)")


def apply_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """`model` wrapped with LoRA adapters (module doc); the base weights are frozen in place."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The LLaDA2MoeModelLM under a PeftModel (its Linear layers hold the adapters), or
    `model` itself."""
    return model.get_base_model() if is_lora(model) else model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(config, cfg) -> int:
    """Adapter parameters of `cfg` on a model of `config` (LLaDA2MoeConfig), without building
    it: r * (in + out) per adapted Linear."""
    h, r = config.hidden_size, cfg.r
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    targets = set(cfg.target_modules)
    per_layer_attn = 0
    if "query_key_value" in targets:
        per_layer_attn += r * (h + q + 2 * kv)
    if "dense" in targets:
        per_layer_attn += r * (q + h)

    def mlp(width: int) -> int:
        n = 0
        n += r * (h + width) if "gate_proj" in targets else 0
        n += r * (h + width) if "up_proj" in targets else 0
        n += r * (width + h) if "down_proj" in targets else 0
        return n

    dense = min(config.first_k_dense_replace, config.num_hidden_layers)
    moe = config.num_hidden_layers - dense
    shared = config.moe_intermediate_size * (config.num_shared_experts or 0)
    return (
        config.num_hidden_layers * per_layer_attn
        + dense * mlp(config.intermediate_size)
        + moe * (mlp(shared) if shared else 0)
    )


@torch.no_grad()
def merged_official_state(
    model: torch.nn.Module, gather=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) of base + adapter for an HF export (module doc)."""
    from peft.tuners.lora import LoraLayer

    from llada_train.model.io import official_state_dict

    base = base_model(model)
    adapted = {
        name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)
    }
    for name, t in official_state_dict(base, gather=gather):
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, _, leaf = name.partition(".base_layer.")
            module = adapted[owner]
            if leaf == "weight":
                delta = module.get_delta_weight(module.active_adapters[0])
                t = t + delta.to(t.device, t.dtype)
            name = f"{owner}.{leaf}"
        yield name, t
