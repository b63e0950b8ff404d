"""LLaDA2-MoE configuration: reads and writes the official `config.json` unchanged.

Contract:
- `LLaDA2MoeConfig.from_json(path)` accepts the official file as released (see
  ../shared/reference/) and keeps every key, also the ones this code does not use, so that
  `to_json` writes back a file the official code and SGLang can read.
- Derived quantities (rotary dim, parameter counts) are computed here once.
- Unknown architecture values that would silently change the math (a non-sigmoid router, qkv
  bias, tied embeddings) are rejected with a ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "llada2_moe_veomni"
ARCHITECTURE = "LLaDA2MoeModelLM"

# Keys of the official config.json (../shared/reference/) that this code does not interpret,
# with the values every released LLaDA2.x config has; written for a config that lacks them, so
# that every export carries every official key. `use_qk_norm`: the architecture always applies
# RMSNorm to q and k (query_layernorm / key_layernorm), which readers that check it must see.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "norm_head": False,
    "transformers_version": "4.52.3",
    "use_rmsnorm": True,
    "use_cache": False,
    "embedding_dropout": 0.0,
    "norm_softmax": False,
    "output_dropout": 0.0,
    "using_split_qkv_in_self_attention": False,
    "router_dtype": "fp32",
    "max_window_layers": 28,
    "output_router_logits": False,
    "use_sliding_window": False,
    "use_qk_norm": True,
}


@dataclass
class LLaDA2MoeConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None
    rope_scaling: Any = None
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 156892
    eos_token_id: int | None = None
    mask_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    # Keys of config.json that this code does not interpret, kept for a faithful round trip.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rope_dim(self) -> int:
        """Number of rotated dims per head (the official code: head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.num_experts > 0

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key '{key}': {why}")

        if self.score_function != "sigmoid":
            raise bad(
                "score_function", f"only 'sigmoid' is implemented, got {self.score_function!r}"
            )
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"only 'silu' is implemented, got {self.hidden_act!r}")
        if self.use_qkv_bias or self.use_bias:
            raise bad("use_qkv_bias/use_bias", "LLaDA2 has no linear biases; set both to false")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "LLaDA2 uses an untied lm_head; set it to false")
        if self.rope_scaling not in (None, {}):
            raise bad("rope_scaling", "RoPE scaling is not implemented; set it to null")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", "must divide num_attention_heads")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise bad(
                "partial_rotary_factor", "head_dim * factor must be even and in (0, head_dim]"
            )
        if self.rotary_dim is not None and self.rotary_dim != self.rope_dim:
            raise bad(
                "rotary_dim",
                f"{self.rotary_dim} != head_dim * partial_rotary_factor = {self.rope_dim}",
            )
        if self.num_experts:
            if self.num_experts % self.n_group:
                raise bad("n_group", f"must divide num_experts ({self.num_experts})")
            if not 0 < self.topk_group <= self.n_group:
                raise bad("topk_group", "must be in [1, n_group]")
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise bad(
                    "n_group", "each group needs at least 2 experts (group score = top-2 sum)"
                )
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise bad("num_experts_per_tok", "exceeds the experts in the kept groups")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> LLaDA2MoeConfig:
        """Build from a config.json dict; unknown keys go to `extra` unless `strict`.

        strict=True is for our own YAML configs, where an unknown key is a typo.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "extra"}
        if strict and extra:
            raise ValueError(
                f"unknown model config key(s) {sorted(extra)}; valid keys: {sorted(names)}"
            )
        extra.update(d.get("extra", {}) or {})
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LLaDA2MoeConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(
                f"{path}: no config.json found; point to an HF-format model dir"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: every key of the official config (`OFFICIAL_DEFAULTS` for the
        ones not set), our fields, then the keys read from a file, unchanged."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        for k in ("eos_token_id", "mask_token_id"):
            if d[k] is None:
                del d[k]
        if d["rotary_dim"] is None:
            d["rotary_dim"] = self.rope_dim
        return {**OFFICIAL_DEFAULTS, **d, **self.extra}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")

    # ------------------------------------------------------------------ counts
    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, from the shapes alone.

        Active counts embeddings, attention, norms, the dense layers, the router, the shared
        expert and `num_experts_per_tok` routed experts per MoE layer, and the lm_head.
        """
        h, v = self.hidden_size, self.vocab_size
        attn = h * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        attn += self.num_attention_heads * self.head_dim * h + 2 * self.head_dim  # dense, q/k norm
        norms = 2 * h
        dense_mlp = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        shared = expert * self.num_shared_experts
        router = self.num_experts * h
        total = active = 2 * v * h + h  # embeddings, lm_head, final norm
        for i in range(self.num_hidden_layers):
            base = attn + norms
            if self.is_moe_layer(i):
                total += base + router + shared + self.num_experts * expert
                active += base + router + shared + self.num_experts_per_tok * expert
            else:
                total += base + dense_mlp
                active += base + dense_mlp
        return total, active
