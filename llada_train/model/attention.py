"""Attention kernels of the model: SDPA with a dense boolean mask, or block-sparse FlexAttention.

Contract:
- Backends: `sdpa` (`F.scaled_dot_product_attention` with the dense boolean mask; the
  reference, and the CPU default) and `flex` (`torch.nn.attention.flex_attention` with a
  `BlockMask`: blocks of 128 x 128 scores that the mask rules out are never computed; the
  training layout [x_t ; x_0] keeps about 1/4 of its scores). `auto` = `flex` on CUDA, `sdpa`
  elsewhere: on CPU FlexAttention has no backward, and SDPA is faster at the short lengths
  the CPU runs (BENCHMARKS.md).
- The model resolves a mask once per forward with `resolve_mask`: an `AttentionMask`
  (`llada_train.masks`) becomes a BlockMask under `flex`, its dense tensor under `sdpa`; a plain
  boolean tensor or None always goes to SDPA (None: full attention, flash kernels on GPU, which
  beat any masked kernel when nothing is masked).
- `attend(q, k, v, mask)`: a BlockMask runs FlexAttention, anything else SDPA. On CUDA
  FlexAttention runs compiled (one fused Triton kernel for forward and backward); elsewhere
  the FlexAttention higher-order op runs eagerly (its dense math forward and backward: the
  public call would trace it with dynamo per shape, and refuses backward on CPU). That path
  exists so the equivalence tests can check logits and gradients of both backends on CPU; it
  is not fast (`scripts/bench_attention.py` times the compiled CPU kernel).
- Every query row must see at least one key (the masks of `llada_train.masks` guarantee it):
  SDPA returns NaN for an empty row, FlexAttention zeros.

Legend: B batch, nH query heads, Hkv key/value heads, Lq queries, Lk keys, D head_dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llada_train.masks import AttentionMask

BACKENDS = ("auto", "sdpa", "flex")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'sdpa' or 'flex' for the requested backend ('auto' | 'sdpa' | 'flex') on `device`.

    Raises ValueError for an unknown name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: use one of {list(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def resolve_mask(
    mask: AttentionMask | torch.Tensor | None, backend: str, device: torch.device
) -> torch.Tensor | object | None:
    """What the attention layers get: a BlockMask (flex), a bool tensor or None (SDPA)."""
    use_flex = resolve_backend(backend, device) == "flex"
    if isinstance(mask, AttentionMask):
        return mask.block_mask() if use_flex else mask.dense()
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError("attention_mask must be a boolean tensor (True = may attend)")
    return mask


def attend(
    q: torch.Tensor,  # (B, nH, Lq, D)
    k: torch.Tensor,  # (B, Hkv, Lk, D)
    v: torch.Tensor,  # (B, Hkv, Lk, D)
    mask: torch.Tensor | object | None,  # BlockMask | bool (B|1, 1, Lq, Lk) | None
) -> torch.Tensor:
    """Softmax attention (B, nH, Lq, D) with scale D**-0.5 and grouped key/value heads."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None or isinstance(mask, torch.Tensor):
        if gqa and mask is not None and q.device.type == "cuda":
            # with a mask SDPA cannot use flash, and depending on the version its
            # memory-efficient kernel refuses grouped heads (then: the math fallback, which
            # materialises every score); repeating the key/value heads keeps the fused kernel
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _flex(q, k, v, mask, gqa)


def _flex(q, k, v, block_mask, gqa: bool) -> torch.Tensor:
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return _flex_math(q, k, v, block_mask, gqa)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # automatic dynamic shapes: the sampler's key length grows block by block, and a static
    # compile per length would run into dynamo's recompile limit (then eager: dense math)
    return torch.compile(flex_attention)


def _flex_math(q, k, v, block_mask, gqa: bool) -> torch.Tensor:
    """FlexAttention's own higher-order op, eagerly: dense math forward and backward (CPU).

    What the public eager call runs too, minus its per-shape dynamo tracing and its refusal of
    backward on CPU.
    """
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop

    def identity_score(score, b, h, q_idx, kv_idx):
        return score

    assert gqa or q.shape[1] == k.shape[1]
    options = {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}
    out, _, _ = flex_hop(
        q, k, v, identity_score, block_mask.as_tuple(), q.shape[-1] ** -0.5, options
    )
    return out
