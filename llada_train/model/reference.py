"""Slow reference implementations, for tests and benchmarks only (never on a training path).

`naive_moe_forward` is the per-expert Python loop of the official training code, applied to the
weights of our stacked `SparseMoE`: the baseline our grouped-matmul dispatch must equal and beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_train.model.modeling import SparseMoE


def naive_moe_forward(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """x (..., H) -> (..., H), looping over experts like the official `training` branch."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    topk_idx, topk_w, _ = moe.gate(flat)
    k = topk_idx.shape[1]
    rep = flat.repeat_interleave(k, dim=0)  # (T*K, H)
    flat_idx = topk_idx.reshape(-1)
    y = torch.zeros_like(rep)
    width = moe.experts.intermediate_size
    for e in range(moe.num_experts):
        sel = flat_idx == e
        gate_w = moe.experts.gate_up_proj[e, :, :width]
        up_w = moe.experts.gate_up_proj[e, :, width:]
        h = rep[sel]
        y[sel] = (F.silu(h @ gate_w) * (h @ up_w)) @ moe.experts.down_proj[e]
    y = (y.view(-1, k, shape[-1]) * topk_w.unsqueeze(-1)).sum(1).to(x.dtype)  # fp32 sum
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(shape)
