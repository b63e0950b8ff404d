"""EBPO: ELBO-based block-level policy optimisation (SPEC section 5; LLaDA2.1 report eq. 4-5).

Legend:
    B, L, V   batch size (sequences), sequence length, vocabulary size
    x0        clean sequences (B, L) = [prompt x ; response y ; padding]
    y         the response: `response_mask` (B, L) marks it (see "What y is" below)
    N, n      number of noise levels, level index; t_n the mask ratio of level n (per sequence)
    xt        x0 with response tokens masked at ratio t_n (prompt and padding never masked)
    z_n       the training input [xt ; x0] of `masks.training_inputs` at level n
    block b   positions b * block_length .. (b + 1) * block_length - 1, aligned to position 0
              of the whole sequence (a block may hold prompt and response);
              K = ceil(L / block_length) blocks
    w_n       weight of level n (`level_weights`)
    theta, old, ref   the policy being trained, the rollout policy, the optional reference model
    rho       per-sequence likelihood ratio p_theta(y|x) / p_old(y|x); A its advantage

The estimate (one ratio per sequence):

    T_{n,b}    = sum over the positions i of block b masked at level n of log p(x0_i | z_n)
    log p(y|x) ~= ELBO = sum_n w_n sum_b T_{n,b}
    log rho    ~= sum_n w_n sum_b [T^theta_{n,b} - T^old_{n,b}]

One forward per level gives T_{n,b} of every block b at once: in the layout of section 2 the noisy
block b attends to itself and to the clean blocks < b, which is exactly the context of block b
when it is decoded. The objective is the clipped surrogate
    J = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
summed over sequences (`ebpo_loss`), or weighted by response length (`grpo_loss`), with
rho = exp(log rho clamped to +-LOG_RATIO_CLAMP): a sequence-level log ratio sums many tokens,
and exp of it must not overflow to inf (inf * 0 = nan in the backward).

What y is [design choice]: the generated tokens up to and including the first EOS. Positions
after it are padding: never masked, never scored, visible (as EOS) in every xt, identical for
theta, old and ref. `response_mask_from_eos` builds this mask. A caller may pass any other
response mask (e.g. the padding to the end of the last block, as SFT supervises it); nothing
below depends on how it was chosen. With visible padding the ELBO is that of y given x and
where y ends; the condition is the same for theta and old, so the ratio is unaffected by it.

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

Conventions: a loss returns (loss_sum, count, stats); the loop divides by the global count
(all-reduced, see `losses.micro_batch_loss`). stats is a dict of Python floats (STAT_KEYS) over
the sequences of the call: ratio_mean, ratio_min, ratio_max of rho; clip_fraction, the share of
sequences whose clipped branch is taken (strictly smaller than the unclipped one, so its gradient
is 0); approx_kl, the mean k3 estimate (rho - 1) - log rho of KL(old || theta); kl, the mean k3
to the reference (per sequence for ebpo, per token for grpo; 0.0 without kl_terms). Combine
micro-batches by weighting means with the number of sequences, min by min, max by max.

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
LOG_RATIO_CLAMP = 20.0  # |log rho| and |log p_ref - log p_theta| are clamped here before exp
K3_MAX = 10.0  # the k3 KL of one sequence is clamped here (verl's "low_var_kl")
STAT_KEYS = ("ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "approx_kl", "kl")


# ------------------------------------------------------------------------------------- noise
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


def response_mask_from_eos(
    x0: torch.Tensor,  # (B, L)
    prompt_lengths: torch.Tensor,  # (B,) long: the response starts at this position
    eos_id: int,
) -> torch.Tensor:
    """Bool (B, L): positions from the prompt's end up to and including the first EOS there.

    A response without EOS runs to the end of the row.
    """
    pos = torch.arange(x0.shape[1], device=x0.device)[None]  # (1, L)
    after_prompt = pos >= prompt_lengths.to(x0.device)[:, None]  # (B, L)
    is_eos = (x0 == eos_id) & after_prompt  # (B, L)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before i
    return after_prompt & (eos_before == 0)


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
def block_log_probs(
    logits: torch.Tensor,  # (B, L, V) fp32
    x0: torch.Tensor,  # (B, L)
    is_masked: torch.Tensor,  # (B, L) bool
    block_length: int,
) -> torch.Tensor:
    """(B, K): per block b, sum of log p(x0_i | z) over the masked positions i of block b.

    Only the masked rows are gathered (M, V) before the log-softmax. Each block's sum runs over
    its own positions only (fixed order, zeros elsewhere), so a block's term depends on nothing
    but the logits of its masked positions, bit for bit.
    """
    if logits.shape[:2] != x0.shape or is_masked.shape != x0.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, L, V) with x0 (B, L)")
    batch, seq_len = x0.shape
    num_blocks = math.ceil(seq_len / block_length)
    idx = is_masked.nonzero(as_tuple=True)
    rows = logits[idx].float()  # (M, V)
    log_p = F.log_softmax(rows, dim=-1).gather(-1, x0[idx][:, None]).squeeze(-1)  # (M,)
    per_pos = rows.new_zeros(batch, num_blocks * block_length)  # (B, K * block_length)
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


def sequence_elbo(
    terms: torch.Tensor,  # (N, B, K)
    weights: torch.Tensor,  # (N, B)
) -> torch.Tensor:
    """(B,): the weighted ELBO sum_n w_n sum_b T_{n,b} of each sequence."""
    return (weights.to(terms.dtype) * terms.sum(-1)).sum(0)


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


# ----------------------------------------------------------------------------- objectives
def k3_kl(ref_log_ratio: torch.Tensor) -> torch.Tensor:
    """(B,) k3 estimate of KL(theta || ref) from lr = log p_ref - log p_theta (B,).

    k3 = exp(lr) - lr - 1 >= 0, 0 iff lr = 0. lr is clamped to +-LOG_RATIO_CLAMP and k3 to
    K3_MAX, as verl's "low_var_kl" does: a sequence-level log ratio sums many tokens and exp of
    it overflows easily. Build lr as `sequence_log_ratio(ref_terms, policy_terms, weights)`.
    """
    lr = ref_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(lr) - lr - 1.0).clamp(max=K3_MAX)


def _clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, rho, is_clipped), all (B,)."""
    if log_ratio.dim() != 1 or advantages.shape != log_ratio.shape:
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and advantages must both be (B,)")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    advantages = advantages.to(log_ratio.device, log_ratio.dtype).detach()
    rho = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (B,)
    unclipped = rho * advantages
    clipped = rho.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    # The min, written as a where so that a tie takes the unclipped branch with its full
    # gradient; the clipped branch is taken only when strictly smaller, i.e. when rho lies
    # strictly outside the clip range, where clamp passes no gradient.
    is_clipped = clipped < unclipped  # (B,)
    return torch.where(is_clipped, clipped, unclipped), rho, is_clipped


def _stats(
    rho: torch.Tensor, is_clipped: torch.Tensor, kl: torch.Tensor | None, weight: torch.Tensor
) -> dict[str, float]:
    """Means over this call's sequences (module docstring, "Conventions")."""
    rho = rho.detach().double()
    if rho.numel() == 0:
        return dict.fromkeys(STAT_KEYS, 0.0)
    weight = weight.detach().double()
    return {
        "ratio_mean": float(rho.mean()),
        "ratio_min": float(rho.min()),
        "ratio_max": float(rho.max()),
        "clip_fraction": float(is_clipped.double().mean()),
        # k3 estimate of KL(old || theta) from samples of old: (rho - 1) - log rho >= 0
        "approx_kl": float(((rho - 1.0) - torch.log(rho)).mean()),
        "kl": float((kl.detach().double() * weight).sum() / weight.sum().clamp_min(1.0))
        if kl is not None
        else 0.0,
    }


def ebpo_loss(
    log_ratio: torch.Tensor,  # (B,) log rho, with grad
    advantages: torch.Tensor,  # (B,)
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    *,
    kl_terms: torch.Tensor | None = None,  # (B,) log p_ref - log p_theta, with grad
    kl_coef: float = 0.0,
    response_len: torch.Tensor | None = None,  # unused: the objective is per sequence
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """EBPO loss: (loss_sum, count, stats), count = number of sequences.

    loss_sum = sum_i [-min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
                      + kl_coef k3_i]
    with rho_i = exp(log_ratio_i) (log ratio clamped to +-LOG_RATIO_CLAMP) and k3_i = k3_kl of
    kl_terms_i (only when kl_terms is given and kl_coef > 0). Advantages are detached.
    """
    objective, rho, is_clipped = _clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
    per_seq = -objective  # (B,)
    kl = k3_kl(kl_terms) if kl_terms is not None else None
    if kl is not None and kl_coef:
        per_seq = per_seq + kl_coef * kl
    stats = _stats(rho, is_clipped, kl, torch.ones_like(rho))
    return per_seq.sum(), torch.tensor(per_seq.numel(), device=per_seq.device), stats


def grpo_loss(
    log_ratio: torch.Tensor,  # (B,)
    advantages: torch.Tensor,  # (B,)
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    *,
    kl_terms: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    response_len: torch.Tensor | None = None,  # (B,) |y|, required
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Token-mean baseline on the same sequence ratio: (loss_sum, count = sum |y|, stats).

    Every token of sequence i shares its ratio rho_i, and the loss is the DAPO-style token mean
    sum_i |y_i| (-clipped objective_i + kl_coef k3_i) / sum_i |y_i|: the same clipping as
    `ebpo_loss`, but a long response weighs in proportion to its length. (GRPO's own per-sequence
    mean of token means equals `ebpo_loss` when the ratio is per sequence.)
    """
    if response_len is None:
        raise ValueError("grpo_loss needs response_len (B,), the number of response tokens")
    objective, rho, is_clipped = _clipped_surrogate(log_ratio, advantages, eps_low, eps_high)
    length = response_len.to(objective.device, objective.dtype)  # (B,)
    per_seq = -objective  # (B,)
    kl = k3_kl(kl_terms) if kl_terms is not None else None
    if kl is not None and kl_coef:
        per_seq = per_seq + kl_coef * kl
    stats = _stats(rho, is_clipped, kl, length)
    return (per_seq * length).sum(), response_len.sum().to(objective.device), stats


ObjectiveFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, float]]]
OBJECTIVES: dict[str, ObjectiveFn] = {"ebpo": ebpo_loss, "grpo": grpo_loss}
