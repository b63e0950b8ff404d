"""The block-diffusion ELBO: one module for the RL ratio and the evaluation log-likelihood.

Legend:
    B, L, V   batch size (sequences), sequence length, vocabulary size
    x0        clean sequences (B, L) = [prompt x ; response y ; padding]
    y         the scored tokens: `response_mask` (B, L) marks them (RL: the completion up to and
              including its first EOS; evaluation: the continuation)
    N, n      number of noise levels, level index; t_n the mask ratio of level n (per sequence)
    xt        x0 with response tokens masked at ratio t_n (prompt and padding never masked)
    z_n       the training input [xt ; x0] of `masks.training_inputs` at level n
    block b   positions b * block_length .. (b + 1) * block_length - 1, aligned to position 0
              of the whole sequence (a block may hold prompt and response);
              K = ceil(L / block_length) blocks
    w_n       weight of level n (`level_weights`)

The estimate:

    T_{n,b}    = sum over the positions i of block b masked at level n of log p(x0_i | z_n)
    log p(y|x) ~= ELBO = sum_n w_n sum_b T_{n,b}
    log rho    ~= sum_n w_n sum_b [T^theta_{n,b} - T^old_{n,b}]   (RL, `sequence_log_ratio`)

One forward per level gives T_{n,b} of every block b at once: in the layout of SPEC section 2 the
noisy block b attends to itself and to the clean blocks < b, which is exactly the context of
block b when it is decoded. Every term is read by `masked_log_probs`, which gathers the masked
rows before the log-softmax; the evaluation's Monte Carlo log-likelihood (`eval/lm.py`, its own
count-form draws and weights n / k) reads its terms through the same function.

Noise [design choice]: level n of a sequence uses t_n = (n + u_n) / N with u_n ~ U(0, 1] drawn
from the sequence's seed (stratified: exactly one t_n in each interval (n/N, (n+1)/N], and t_n > 0
so 1/t_n is finite), or the midpoint t_n = (n + 1/2) / N for every sequence when stratified is
False (only the masked positions are then random). Each response token is masked independently
with probability t_n. All draws come from CPU generators seeded from (sequence seed, level n),
with a fixed number of draws per level, so they depend only on the seed, n, N and the position,
not on L (padding), batch mates, device or process: the same seeds give theta and old the same
z_n (common random numbers), which makes rho exactly 1 at the first update. Re-using the seeds
over the optimiser steps of one rollout batch lets the old terms be computed once.

Weights [design choice] (`level_weights`):
    "elbo"         w_n = 1 / (N t_n): the Monte Carlo estimate of the masked-diffusion ELBO
                   E_t[(1/t) sum_{masked i} log p(y_i | z_t)] with N stratified samples of t.
    "elbo_length"  w_n = 1 / (N t_n |y|): the ELBO per response token (ESPO-style length
                   normalisation), so a long response does not get an exponentially larger or
                   smaller ratio than a short one for the same per-token change.

Functions take tensors and return tensors (no config objects, no torch.distributed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from llada_train.masks import training_inputs

_MASK63 = (1 << 63) - 1
WEIGHT_SCHEMES = ("elbo", "elbo_length")


@dataclasses.dataclass
class NoiseLevel:
    """One noise level of a batch: its corrupted sequences and their mask ratios."""

    xt: torch.Tensor  # (B, L) long: x0 with the masked response tokens set to mask_id
    is_masked: torch.Tensor  # (B, L) bool: xt == mask_id (response positions only)
    t: torch.Tensor  # (B,) float64: mask ratio t_n of each sequence


def _level_seed(seed: int, level: int) -> int:
    """Seed of level `level` of a sequence seed (blake2b; same in every process)."""
    digest = hashlib.blake2b(
        struct.pack("<2q", seed, level), digest_size=8, person=b"llada-ebpo"
    ).digest()
    return int.from_bytes(digest, "little") & _MASK63


def elbo_noise(
    x0: torch.Tensor,  # (B, L)
    response_mask: torch.Tensor,  # (B, L) bool
    num_levels: int,
    seeds: Sequence[int],
    mask_id: int,
    *,
    stratified: bool = True,
) -> list[NoiseLevel]:
    """The N noise levels of each sequence (module docstring, "Noise"); one seed per sequence."""
    if x0.dim() != 2 or response_mask.shape != x0.shape or response_mask.dtype != torch.bool:
        raise ValueError("x0 must be (B, L) and response_mask a bool tensor of the same shape")
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"need one seed per sequence: got {len(seeds)} for batch {x0.shape[0]}")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    seq_len = x0.shape[1]
    levels = []
    for n in range(num_levels):
        rows = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(_level_seed(int(s), n))
            rows.append(torch.rand(1 + seq_len, generator=g, dtype=torch.float64))
        u = torch.stack(rows).to(x0.device)  # (B, 1 + L) float64 in [0, 1)
        if stratified:
            t = (n + (1.0 - u[:, 0])) / num_levels  # (B,) in (n/N, (n+1)/N]
        else:
            t = torch.full_like(u[:, 0], (n + 0.5) / num_levels)  # (B,)
        is_masked = response_mask & (u[:, 1:] < t[:, None])  # (B, L)
        xt = torch.where(is_masked, mask_id, x0)  # (B, L)
        levels.append(NoiseLevel(xt=xt, is_masked=is_masked, t=t))
    return levels


# ------------------------------------------------------------------------------ ELBO terms
def masked_log_probs(
    logits: torch.Tensor,  # (B, L, V)
    x0: torch.Tensor,  # (B, L)
    is_masked: torch.Tensor,  # (B, L) bool
    *,
    exclude_id: int | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """log p(x0_i | z) at the masked positions i: (row, column) indices of `is_masked` (M,) each,
    float32 log-probabilities (M,), and whether x0_i is the argmax there (M,) bool.

    Only the M masked rows are gathered (M, V) and cast to float32 before the log-softmax, so no
    (B, L, V) intermediate beyond the logits exists. `exclude_id` (the mask token) gets logit
    -inf first: the distribution is renormalised without it, as the sampler never proposes it.
    Raises ValueError on mismatched shapes.
    """
    if logits.shape[:2] != x0.shape or is_masked.shape != x0.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, L, V) with x0 (B, L)")
    idx = is_masked.nonzero(as_tuple=True)
    rows = logits[idx].float()  # (M, V), a copy
    if exclude_id is not None:
        rows[:, exclude_id] = float("-inf")
    target = x0[idx]  # (M,)
    log_p = F.log_softmax(rows, dim=-1).gather(-1, target[:, None]).squeeze(-1)  # (M,)
    return idx, log_p, rows.argmax(-1) == target


def block_log_probs(
    logits: torch.Tensor,  # (B, L, V) fp32
    x0: torch.Tensor,  # (B, L)
    is_masked: torch.Tensor,  # (B, L) bool
    block_length: int,
) -> torch.Tensor:
    """(B, K): per block b, sum of log p(x0_i | z) over the masked positions i of block b.

    Each block's sum runs over its own positions only (fixed order, zeros elsewhere), so a
    block's term depends on nothing but the logits of its masked positions, bit for bit.
    """
    batch, seq_len = x0.shape
    num_blocks = math.ceil(seq_len / block_length)
    idx, log_p, _ = masked_log_probs(logits, x0, is_masked)  # (M,)
    per_pos = log_p.new_zeros(batch, num_blocks * block_length)  # (B, K * block_length)
    per_pos = per_pos.index_put((idx[0], idx[1]), log_p)
    return per_pos.view(batch, num_blocks, block_length).sum(-1)  # (B, K)


def elbo_terms(
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,  # (B, L)
    levels: Sequence[NoiseLevel],
    block_length: int,
) -> torch.Tensor:
    """(N, B, K): `block_log_probs` of every level, one forward of `model_fn` per level.

    model_fn(input_ids, attention_mask=..., position_ids=..., logits_slice=...) -> (B, L, V)
    fp32 logits (e.g. `LLaDA2MoeModelLM.__call__`). Run it under torch.no_grad for old and ref.
    The graphs of all N forwards are kept until backward.
    """
    terms = []
    for level in levels:
        input_ids, mask, positions, logits_slice = training_inputs(level.xt, x0, block_length)
        logits = model_fn(
            input_ids, attention_mask=mask, position_ids=positions, logits_slice=logits_slice
        )  # (B, L, V)
        terms.append(block_log_probs(logits, x0, level.is_masked, block_length))
    return torch.stack(terms)  # (N, B, K)


def level_weights(
    t: torch.Tensor,  # (N, B)
    response_len: torch.Tensor,  # (B,) number of response tokens |y|
    scheme: str = "elbo",
) -> torch.Tensor:
    """(N, B) float32 weights w_n (module docstring, "Weights").

    An empty response (|y| = 0) has no masked token, so its terms are 0 whatever the weight;
    |y| is clamped to 1 to keep the weight finite.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"weight scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
    if t.dim() != 2 or response_len.shape != t.shape[1:]:
        raise ValueError(f"t {tuple(t.shape)} must be (N, B) with response_len (B,)")
    num_levels = t.shape[0]
    w = 1.0 / (num_levels * t.double())  # (N, B)
    if scheme == "elbo_length":
        w = w / response_len.to(w.device, torch.float64).clamp_min(1.0)[None]
    return w.float()


def stack_t(levels: Sequence[NoiseLevel]) -> torch.Tensor:
    """(N, B) mask ratios of the levels, the input of `level_weights`."""
    return torch.stack([level.t for level in levels])


def sequence_log_ratio(
    new_terms: torch.Tensor,  # (N, B, K)
    old_terms: torch.Tensor,  # (N, B, K) on the same noise levels
    weights: torch.Tensor,  # (N, B)
) -> torch.Tensor:
    """(B,): log rho ~= sum_n w_n sum_b (new - old). Exactly 0 where the terms are equal.

    Gradients flow through whichever argument has them: (theta, old) gives log rho for the
    surrogate (old computed under no_grad); (ref, theta) gives log p_ref - log p_theta, the
    `kl_terms` of the objectives, with its gradient through theta.
    """
    diff = new_terms - old_terms  # (N, B, K)
    return (weights.to(diff.dtype) * diff.sum(-1)).sum(0)
