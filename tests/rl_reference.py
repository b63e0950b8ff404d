"""Reference helpers of the RL tests that the library does not need (it builds the response
mask from the sampler's completions, reduces metrics over ranks itself, and scores a batch of
code through `rewards.score_batch`)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from llada_train.rl.advantages import as_groups, zero_variance_fraction
from llada_train.rl.sandbox import SandboxResult, run_python


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


def sequence_elbo(
    terms: torch.Tensor,  # (N, B, K)
    weights: torch.Tensor,  # (N, B)
) -> torch.Tensor:
    """(B,): the weighted ELBO sum_n w_n sum_b T_{n,b} of each sequence."""
    return (weights.to(terms.dtype) * terms.sum(-1)).sum(0)


def reward_stats(rewards: torch.Tensor, group_size: int | None = None) -> dict[str, float]:
    """reward/mean, reward/std (population, whole batch), reward/min, reward/max,
    reward/zero_variance_fraction, reward/any_positive_fraction (groups with a reward > 0)."""
    r = as_groups(rewards, group_size).double()  # (P, G)
    if r.numel() == 0:
        return {}
    return {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std(unbiased=False)),
        "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "reward/zero_variance_fraction": zero_variance_fraction(r),
        "reward/any_positive_fraction": float((r > 0).any(dim=1).double().mean()),
    }


def advantage_stats(advantages: torch.Tensor) -> dict[str, float]:
    """advantage/mean, advantage/std (population), advantage/min, advantage/max,
    advantage/nonzero_fraction (share of responses that carry a learning signal)."""
    a = advantages.detach().double().reshape(-1)
    if a.numel() == 0:
        return {}
    return {
        "advantage/mean": float(a.mean()),
        "advantage/std": float(a.std(unbiased=False)),
        "advantage/min": float(a.min()),
        "advantage/max": float(a.max()),
        "advantage/nonzero_fraction": float((a != 0).double().mean()),
    }


def run_many(
    codes: Sequence[str], *, max_workers: int = 8, **kwargs: object
) -> list[SandboxResult]:
    """`run_python` on each of `codes` with the same keyword arguments, in a thread pool (the
    threads only wait on subprocesses); results in the order of `codes`."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(codes)))) as pool:
        return list(pool.map(lambda code: run_python(code, **kwargs), codes))
