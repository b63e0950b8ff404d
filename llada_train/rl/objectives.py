"""EBPO: ELBO-based block-level policy optimisation (SPEC section 5; LLaDA2.1 report eq. 4-5).

Legend: B sequences; rho the per-sequence likelihood ratio p_theta(y|x) / p_old(y|x), its log
estimated by the block-level ELBO (`llada_train.elbo.sequence_log_ratio`); A its advantage;
theta, old, ref the policy being trained, the rollout policy, the optional reference model.

The objective is the clipped surrogate
    J = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
summed over sequences (`ebpo_loss`), or weighted by response length (`grpo_loss`), with
rho = exp(log rho clamped to +-LOG_RATIO_CLAMP): a sequence-level log ratio sums many tokens,
and exp of it must not overflow to inf (inf * 0 = nan in the backward).

What y is [design choice]: the generated tokens up to and including the first EOS. Positions
after it are padding: never masked, never scored, visible (as EOS) in every xt, identical for
theta, old and ref (the RL loop's `build_sequences` builds this mask). A caller may pass any
other response mask (e.g. the padding to the end of the last block, as SFT supervises it);
nothing below depends on how it was chosen. With visible padding the ELBO is that of y given x
and where y ends; the condition is the same for theta and old, so the ratio is unaffected by it.

Conventions: a loss returns (loss_sum, count, stats); the loop divides by the global count
(all-reduced, see `losses.micro_batch_loss`). stats is a dict of Python floats (STAT_KEYS) over
the sequences of the call: ratio_mean, ratio_min, ratio_max of rho; clip_fraction, the share of
sequences whose clipped branch is taken (strictly smaller than the unclipped one, so its gradient
is 0); approx_kl, the mean k3 estimate (rho - 1) - log rho of KL(old || theta); kl, the mean k3
to the reference (per sequence for ebpo, per token for grpo; 0.0 without kl_terms). Combine
micro-batches by weighting means with the number of sequences, min by min, max by max. Each
objective declares what it counts (sequences for ebpo, response tokens for grpo) through the
count it returns; `loss_count` reads it before any forward, since the loop all-reduces the
global count before the first backward.

Functions take tensors and return tensors (no config objects, no torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOG_RATIO_CLAMP = 20.0  # |log rho| and |log p_ref - log p_theta| are clamped here before exp
K3_MAX = 10.0  # the k3 KL of one sequence is clamped here (verl's "low_var_kl")
STAT_KEYS = ("ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "approx_kl", "kl")


# ----------------------------------------------------------------------------- objectives
def k3_kl(ref_log_ratio: torch.Tensor) -> torch.Tensor:
    """(B,) k3 estimate of KL(theta || ref) from lr = log p_ref - log p_theta (B,).

    k3 = exp(lr) - lr - 1 >= 0, 0 iff lr = 0, computed as expm1(lr) - lr: `exp(lr) - 1` in
    float32 loses every digit below 1e-7, so at lr = 1e-6 it read -6e-8 (OpenRLHF#1335). lr is
    clamped to +-LOG_RATIO_CLAMP and k3 to K3_MAX, as verl's "low_var_kl" does: a
    sequence-level log ratio sums many tokens and exp of it overflows easily. Build lr as
    `sequence_log_ratio(ref_terms, policy_terms, weights)`.
    """
    lr = ref_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(lr) - lr).clamp(min=0.0, max=K3_MAX)  # >= 0 also after rounding


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


def loss_count(objective: ObjectiveFn, response_len: torch.Tensor) -> torch.Tensor:
    """The count `objective` divides by for sequences of `response_len` (B,) response tokens:
    the count it returns itself, read on a zero ratio and advantage (no forward needed)."""
    zeros = torch.zeros(response_len.shape, dtype=torch.float32, device=response_len.device)
    return objective(zeros, zeros, response_len=response_len)[1]
