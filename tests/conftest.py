"""Shared fixtures: tiny configs and models built in-process (no files, no network)."""

from __future__ import annotations

import os

import pytest
import torch

from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.modeling import LLaDA2MoeModelLM

# Copies of the official config.json files of LLaDA2.x mini and flash (unchanged).
REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "data", "reference")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tiny_config(**overrides) -> LLaDA2MoeConfig:
    """Every architectural feature (dense layer 0, MoE with groups and a shared expert, GQA,
    partial RoPE) at a size that runs in milliseconds."""
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        torch_dtype="float32",
    )
    base.update(overrides)
    return LLaDA2MoeConfig(**base)


@pytest.fixture
def tiny_model() -> LLaDA2MoeModelLM:
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(tiny_config()).eval()


def reference_config_path(name: str) -> str:
    return os.path.join(REFERENCE_DIR, f"llada2_{name}_config.json")
