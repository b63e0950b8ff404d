"""Group-relative advantages of EBPO and the share of groups without signal (SPEC section 5).

Legend:
    P, G      number of prompts, responses per prompt (the group size)
    r         rewards (P, G), or flat (P * G,) with the G responses of prompt p contiguous at
              [p * G, (p + 1) * G) (the order rollouts are produced in)
    A         advantages (P, G)

    A = (r - mean_group(r)) / (std_group(r) + eps)     (scale_std=True)
    A =  r - mean_group(r)                              (scale_std=False, Dr. GRPO style)

std_group is the *population* standard deviation (divide by G) [design choice]: the advantages of
a group then have mean 0 and mean square exactly 1 (up to eps) whatever G, e.g. rewards
[1, 0, 0, 1] give [1, -1, -1, 1]. The sample std (divide by G - 1, `torch.std`'s default, used by
TRL's GRPO) shrinks every advantage by sqrt((G - 1) / G), a factor that depends on G alone (0.71
at G = 2) and so only rescales the learning rate between group sizes. A group whose rewards are
all equal ("zero variance") gets A = 0 exactly, for any eps: it carries no learning signal, and
`zero_variance_fraction` reports how much of the batch that is.

Functions take tensors and return tensors or floats (no config objects, no torch.distributed).
"""

from __future__ import annotations

import torch


def as_groups(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """(P, G) view of rewards given as (P, G) or flat (P * G,) with `group_size`."""
    if rewards.dim() == 2:
        if group_size is not None and rewards.shape[1] != group_size:
            raise ValueError(f"rewards {tuple(rewards.shape)} do not have group size {group_size}")
        return rewards
    if rewards.dim() != 1 or group_size is None or group_size < 1:
        raise ValueError("rewards must be (P, G), or flat (P * G,) with group_size >= 1")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,  # (P, G) or (P * G,)
    group_size: int | None = None,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(P, G) float32 group-relative advantages (module docstring).

    Raises ValueError for a non-finite reward: one NaN would turn its whole group's advantages
    into NaN. `rewards.score` already turns a reward that returns NaN or inf into an error
    scored 0.0 (counted and logged as reward/errors), so this only guards other callers.
    """
    r = as_groups(rewards, group_size).double()  # (P, G)
    if not torch.isfinite(r).all():
        raise ValueError("non-finite reward: score it as a reward error (0.0) before advantages")
    centred = r - r.mean(dim=1, keepdim=True)  # (P, G)
    if scale_std:
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    # exactly 0 for equal rewards (the float mean of equal values may miss them by an ulp, and
    # eps = 0 would give 0 / 0)
    is_constant = (r == r[:, :1]).all(dim=1, keepdim=True)  # (P, 1)
    return torch.where(is_constant, 0.0, centred).float()


def has_signal(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """(P,) bool: True for a group whose rewards are not all equal, i.e. one with a nonzero
    advantage (DAPO's dynamic sampling keeps exactly these groups)."""
    r = as_groups(rewards, group_size)  # (P, G)
    return ~(r == r[:, :1]).all(dim=1)


def zero_variance_fraction(rewards: torch.Tensor, group_size: int | None = None) -> float:
    """Share of groups whose rewards are all equal (they get A = 0 everywhere)."""
    signal = has_signal(rewards, group_size)  # (P,)
    if signal.numel() == 0:
        return 0.0
    return float((~signal).double().mean())
