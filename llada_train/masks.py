"""Attention masks of block diffusion (SPEC section 2), as boolean tensors (True = may attend).

Legend: L sequence length, b block index = position // block_length, doc document id.

- `block_causal_mask`: inference. Query at block bq sees keys at blocks <= bq: bidirectional
  inside a block, causal across blocks. Computed from position ids, so it works for a query
  chunk over a cached prefix and for left-padded batches (padding keys are cut by `key_valid`).
- `block_diffusion_mask`: training on `[x_t ; x_0]` (length 2L, position ids [0..L-1, 0..L-1]).
  Noisy block b sees noisy block b and clean blocks < b; clean block b sees clean blocks <= b;
  clean never sees noisy. With `doc_ids`, every pair must also share a document.
- Masks without documents depend only on (L, block_length, device) and are cached.
- `training_inputs` assembles what the model sees in training from (x_t, x_0): the two-copy
  layout, or x_t alone with full attention when one block covers the sequence.
"""

from __future__ import annotations

import functools

import torch


def block_causal_mask(
    query_positions: torch.Tensor,  # (B|1, Lq) integer positions
    key_positions: torch.Tensor,  # (B|1, Lk)
    block_length: int,
    key_valid: torch.Tensor | None = None,  # bool (B, Lk); False = padding key
) -> torch.Tensor:
    """Bool (B|1, 1, Lq, Lk): key block <= query block (and key valid)."""
    qb = torch.div(query_positions, block_length, rounding_mode="floor")
    kb = torch.div(key_positions, block_length, rounding_mode="floor")
    mask = kb[:, None, :] <= qb[:, :, None]  # (B, Lq, Lk)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask[:, None]


@functools.lru_cache(maxsize=32)
def _block_diffusion_mask_cached(seq_len: int, block_length: int, device: str) -> torch.Tensor:
    return _block_diffusion_mask(seq_len, block_length, torch.device(device), None)


def _block_diffusion_mask(
    seq_len: int, block_length: int, device: torch.device, doc_ids: torch.Tensor | None
) -> torch.Tensor:
    pos = torch.arange(seq_len, device=device)
    b = torch.div(pos, block_length, rounding_mode="floor")  # (L,)
    bq, bk = b[:, None], b[None, :]
    noisy_noisy = bq == bk  # same block, bidirectional
    noisy_clean = bk < bq  # strictly earlier clean blocks
    clean_clean = bk <= bq
    clean_noisy = torch.zeros_like(noisy_noisy)
    top = torch.cat((noisy_noisy, noisy_clean), dim=1)
    bottom = torch.cat((clean_noisy, clean_clean), dim=1)
    mask = torch.cat((top, bottom), dim=0)  # (2L, 2L)
    if doc_ids is None:
        return mask[None, None]
    d = torch.cat((doc_ids, doc_ids), dim=1)  # (B, 2L)
    same_doc = d[:, :, None] == d[:, None, :]
    return (mask[None] & same_doc)[:, None]


def block_diffusion_mask(
    seq_len: int,
    block_length: int,
    device: torch.device | str = "cpu",
    doc_ids: torch.Tensor | None = None,  # (B, L) document id of each clean position
) -> torch.Tensor:
    """Bool (1|B, 1, 2L, 2L) mask of the training layout [x_t ; x_0]."""
    if doc_ids is None:
        return _block_diffusion_mask_cached(seq_len, block_length, str(torch.device(device)))
    return _block_diffusion_mask(seq_len, block_length, doc_ids.device, doc_ids)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, L, L): full attention restricted to the same document (block_length >= L)."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def training_inputs(
    xt: torch.Tensor,  # (B, L) noisy tokens
    x0: torch.Tensor,  # (B, L) clean tokens
    block_length: int,
    doc_ids: torch.Tensor | None = None,  # (B, L) or None (one document per row)
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, slice]:
    """(input_ids, attention_mask, position_ids, logits_slice) for a training forward.

    block_length < L: input [x_t ; x_0] (B, 2L), positions [0..L-1, 0..L-1], the block
    diffusion mask; logits are read from the noisy half. block_length >= L: the layout reduces
    to a full-attention masked diffusion model on x_t alone (no clean copy needed).
    """
    seq_len = xt.shape[1]
    positions = torch.arange(seq_len, device=xt.device)[None]  # (1, L)
    if block_length >= seq_len:
        mask = None if doc_ids is None else document_mask(doc_ids)
        return xt, mask, positions, slice(0, seq_len)
    input_ids = torch.cat((xt, x0), dim=1)  # (B, 2L)
    mask = block_diffusion_mask(seq_len, block_length, xt.device, doc_ids)
    return input_ids, mask, torch.cat((positions, positions), dim=1), slice(0, seq_len)
