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
- `AttentionMask` carries one mask in the two forms the attention backends need: the dense
  boolean tensor of the functions above (SDPA, the reference) and a FlexAttention `BlockMask`
  built from a `mask_mod` that restates the same rule on indices (block-sparse kernels skip
  the blocks it rules out). The model picks the form (`llada_train.model.attention`). A
  BlockMask is built once per cache key (shape and rule: (L, block_length) for training
  without documents; block, lengths and left padding for decoding) and kept in a small LRU;
  with documents it is built once per batch (one forward), shared by every layer.
  `training_inputs` and `decode_mask` return one; the mask_mods are tested equal to the dense
  tensors element by element (tests/test_attention.py).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable

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


# ---------------------------------------------------------------------------- both forms
class AttentionMask:
    """One boolean attention rule (True = may attend) in the two forms the backends need.

    - `dense()`: bool (B|1, 1, Lq, Lk), computed by `dense_fn` (the reference functions of this
      module) on first use; what SDPA takes.
    - `block_mask()`: a `torch.nn.attention.flex_attention.BlockMask` of `mask_mod(b, h, q, kv)`
      (index tensors -> bool), with batch `batch_size` (None = one mask for every row), built on
      first use; when `cache_key` is given it is taken from / put into a module-level LRU of
      `BLOCK_MASK_CACHE_SIZE` masks, so a training run builds the mask of a shape once.

    Sizes: `q_len` queries, `kv_len` keys (cached prefix included). Errors: none beyond those
    of the callables. Source: FlexAttention (PyTorch 2.5+, `create_block_mask`), the rule of
    each mask as in this module's docstring.
    """

    def __init__(
        self,
        dense_fn: Callable[[], torch.Tensor],
        mask_mod: Callable[..., torch.Tensor],
        batch_size: int | None,
        q_len: int,
        kv_len: int,
        device: torch.device,
        cache_key: Hashable | None = None,
    ) -> None:
        self.dense_fn, self.mask_mod = dense_fn, mask_mod
        self.batch_size, self.q_len, self.kv_len = batch_size, q_len, kv_len
        self.device, self.cache_key = torch.device(device), cache_key
        self._dense: torch.Tensor | None = None
        self._block = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.dense_fn()
        return self._dense

    def block_mask(self):  # -> BlockMask (import kept lazy: flex_attention pulls in dynamo)
        if self._block is None:
            key = None if self.cache_key is None else (self.cache_key, str(self.device))
            self._block = _BLOCK_MASKS.get(key) if key is not None else None
            if self._block is None:
                self._block = _build_block_mask(self)
                if key is not None:
                    _BLOCK_MASKS[key] = self._block
                    while len(_BLOCK_MASKS) > BLOCK_MASK_CACHE_SIZE:
                        _BLOCK_MASKS.popitem(last=False)
            elif key is not None:
                _BLOCK_MASKS.move_to_end(key)
        return self._block


BLOCK_MASK_CACHE_SIZE = 64
_BLOCK_MASKS: OrderedDict = OrderedDict()  # (cache_key, device) -> BlockMask, LRU order


def _build_block_mask(spec: AttentionMask):
    from torch.nn.attention.flex_attention import create_block_mask

    # compiled on CUDA: the eager construction materialises (B, Lq, Lk) booleans per mask
    build = _compiled_create_block_mask() if spec.device.type == "cuda" else create_block_mask
    return build(spec.mask_mod, spec.batch_size, None, spec.q_len, spec.kv_len, spec.device)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def block_diffusion_mask_mod(
    seq_len: int, block_length: int, doc_ids: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """mask_mod(b, h, q, kv) of `block_diffusion_mask` on [x_t ; x_0] (positions 0..2L-1).

    The same rule restated on indices: position p < L is noisy, p >= L clean, block (p mod L) //
    block_length; noisy q sees noisy kv of its block and clean kv of earlier blocks; clean q sees
    clean kv of blocks <= its own; with doc_ids (B, L) both must share a document.
    """

    def mask_mod(b, h, q, kv):
        q_noisy, kv_noisy = q < seq_len, kv < seq_len
        q_block = (q % seq_len) // block_length
        kv_block = (kv % seq_len) // block_length
        allowed = torch.where(
            q_noisy,
            torch.where(kv_noisy, kv_block == q_block, kv_block < q_block),
            ~kv_noisy & (kv_block <= q_block),
        )
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q % seq_len] == doc_ids[b, kv % seq_len])
        return allowed

    return mask_mod


def document_mask_mod(doc_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """mask_mod of `document_mask`: q and kv in the same document of row b (doc_ids (B, L))."""

    def mask_mod(b, h, q, kv):
        return doc_ids[b, q] == doc_ids[b, kv]

    return mask_mod


def decode_mask(
    mask_cols: torch.Tensor,  # (Lq,) column whose block the query's rule uses
    q_cols: torch.Tensor,  # (Lq,) true column of each query
    kv_len: int,  # keys are columns [0, kv_len)
    block_length: int,
    pad: list[int],  # left padding (columns) of each row of the batch
    device: torch.device | str = "cpu",
) -> AttentionMask:
    """The sampler's mask (B = len(pad), 1, Lq, kv_len) in both forms.

    Key column c of row r is visible to a query when c // block_length <= mask_col // block_length
    and c >= pad[r] (not padding); a padding query (q_col < pad[r]) also sees its own column, so
    no row is empty (an empty row is NaN in SDPA). The dense form is `block_causal_mask` over
    the columns (position ids differ from columns only by the row's padding, a multiple of
    block_length, so blocks agree). Cached by (block_length, kv_len, pad, columns).
    """
    device = torch.device(device)
    key = (
        "decode",
        block_length,
        kv_len,
        tuple(pad),
        mask_cols.cpu().numpy().tobytes(),  # the sampler passes host tensors: no device sync
        q_cols.cpu().numpy().tobytes(),
    )
    mask_cols, q_cols = mask_cols.to(device), q_cols.to(device)
    pad_t = torch.tensor(pad, device=device)  # (B,)
    max_pad = max(pad)

    def dense_fn() -> torch.Tensor:
        k_cols = torch.arange(kv_len, device=device)
        key_valid = k_cols[None] >= pad_t[:, None] if max_pad else None  # (B, Lk)
        mask = block_causal_mask(mask_cols[None], k_cols[None], block_length, key_valid)
        if int(q_cols.min()) < max_pad:  # padding queries attend to themselves (no empty row)
            q_pad = q_cols[None] < pad_t[:, None]  # (B, Lq)
            own = q_cols[:, None] == k_cols[None, :]  # (Lq, Lk)
            mask = mask | (q_pad[:, :, None] & own[None])[:, None]
        return mask  # (B|1, 1, Lq, Lk)

    def mask_mod(b, h, q, kv):
        allowed = (kv // block_length <= mask_cols[q] // block_length) & (kv >= pad_t[b])
        return allowed | ((q_cols[q] < pad_t[b]) & (q_cols[q] == kv))

    return AttentionMask(dense_fn, mask_mod, len(pad), len(q_cols), kv_len, device, key)


def training_inputs(
    xt: torch.Tensor,  # (B, L) noisy tokens
    x0: torch.Tensor,  # (B, L) clean tokens
    block_length: int,
    doc_ids: torch.Tensor | None = None,  # (B, L) or None (one document per row)
) -> tuple[torch.Tensor, AttentionMask | None, torch.Tensor, slice]:
    """(input_ids, attention_mask, position_ids, logits_slice) for a training forward.

    block_length < L: input [x_t ; x_0] (B, 2L), positions [0..L-1, 0..L-1], the block
    diffusion mask; logits are read from the noisy half. block_length >= L: the layout reduces
    to a full-attention masked diffusion model on x_t alone (no clean copy needed); the mask is
    then None (full attention) or the document mask. The mask is an `AttentionMask`
    (`.dense()` is the boolean tensor); the model takes it as it is.
    """
    seq_len, device = xt.shape[1], xt.device
    positions = torch.arange(seq_len, device=device)[None]  # (1, L)
    if block_length >= seq_len:
        if doc_ids is None:
            return xt, None, positions, slice(0, seq_len)
        mask = AttentionMask(
            lambda: document_mask(doc_ids),
            document_mask_mod(doc_ids),
            doc_ids.shape[0],
            seq_len,
            seq_len,
            device,
        )
        return xt, mask, positions, slice(0, seq_len)
    input_ids = torch.cat((xt, x0), dim=1)  # (B, 2L)
    mask = AttentionMask(
        lambda: block_diffusion_mask(seq_len, block_length, device, doc_ids),
        block_diffusion_mask_mod(seq_len, block_length, doc_ids),
        None if doc_ids is None else doc_ids.shape[0],
        2 * seq_len,
        2 * seq_len,
        device,
        cache_key=("block_diffusion", seq_len, block_length) if doc_ids is None else None,
    )
    return input_ids, mask, torch.cat((positions, positions), dim=1), slice(0, seq_len)
