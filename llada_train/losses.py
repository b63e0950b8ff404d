"""Losses of CPT/SFT (SPEC section 3.6) and of MoE load balancing (SPEC section 1).

Legend:
    B, L, V   batch size, sequence length, vocabulary size; E experts, T tokens, K experts/token
    x0        clean tokens (B, L): the label of every supervised position
    xt, t     corrupted tokens and per-example mask ratio (`corruption.Corruption`)
    M2T       masked positions (learn to fill a mask); T2T noised positions (learn to edit a
              wrong token); keep: unchanged visible positions supervised to stay as they are

Normalisation convention (the only place it is written): a loss function returns a *sum* over
its supervised tokens and their *count*; nothing here divides by a local count. The training
loop all-reduces the count of the whole optimizer step (every rank, every micro-batch) before the
first backward and scales each micro-batch with `micro_batch_loss`, so the gradient applied is
that of (sum over every supervised token of the step) / (their global count), whatever the
number of ranks and accumulation steps. Metrics travel the same way: `LossTerms.stats()` is a
vector of sums the loop may add over micro-batches and all-reduce, and `loss_metrics` turns it
into per-token figures.

Functions take tensors and return tensors (no config objects, no torch.distributed).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from llada_train.corruption import Corruption

WEIGHTINGS = ("none", "inv_t")
PARTS = ("m2t", "t2t", "keep")


@dataclasses.dataclass
class LossPart:
    """Sums of one part over the supervised positions of a micro-batch (all scalars)."""

    loss_sum: torch.Tensor  # float32, with grad, weighted (what is trained)
    ce_sum: torch.Tensor  # float32, detached, unweighted cross-entropy (what is logged)
    count: torch.Tensor  # int64, number of supervised positions
    num_correct: torch.Tensor  # int64, positions whose argmax equals x0
    pad_ce_sum: torch.Tensor  # float32, detached: the cross-entropy of the EOS padding among them
    pad_count: torch.Tensor  # int64, how many of the supervised positions are EOS padding
    pad_num_correct: torch.Tensor  # int64, padding positions whose argmax is EOS


STAT_FIELDS = (
    "loss_sum", "ce_sum", "count", "num_correct", "pad_ce_sum", "pad_count", "pad_num_correct",
)  # fmt: skip


@dataclasses.dataclass
class LossTerms:
    """The three parts of the diffusion loss; `total_sum / global count` is the trained loss."""

    m2t: LossPart
    t2t: LossPart
    keep: LossPart

    @property
    def total_sum(self) -> torch.Tensor:
        return self.m2t.loss_sum + self.t2t.loss_sum + self.keep.loss_sum

    @property
    def total_count(self) -> torch.Tensor:
        return self.m2t.count + self.t2t.count + self.keep.count

    def stats(self) -> torch.Tensor:
        """Detached float64 vector (21,): the STAT_FIELDS of each part, in PARTS order. Add it
        over micro-batches and all-reduce (sum) it, then `loss_metrics`."""
        values = [
            getattr(part, name).detach().double()
            for part in (self.m2t, self.t2t, self.keep)
            for name in STAT_FIELDS
        ]
        return torch.stack(values)  # (21,)


def loss_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Per-token figures from summed `LossTerms.stats()` vectors.

    Keys per part p in PARTS and for "total": loss/p (weighted loss per token), ce/p
    (cross-entropy per token), acc/p (argmax accuracy), tokens/p, over every supervised token;
    and the same split into the response (ce/p/response, acc/p/response, tokens/p/response) and
    the EOS padding after it (ce/p/pad, acc/p/pad, tokens/p/pad). The padding is trivially
    predictable and, in short-answer SFT, most of the supervised positions: acc/m2t can read 0.9
    while the answer tokens are at 0.3 (issue 17), so watch the /response figures. The split
    reports the unweighted cross-entropy (the trained loss itself with weighting "none").
    A group with no token reports 0.0.
    """
    per_part = stats.detach().double().cpu().view(len(PARTS), len(STAT_FIELDS))  # (3, 7)
    rows = {**dict(zip(PARTS, per_part, strict=True)), "total": per_part.sum(0)}
    metrics: dict[str, float] = {}

    def put(key: str, ce_sum, count, num_correct) -> None:
        denom = max(float(count), 1.0)
        metrics[f"ce/{key}"] = float(ce_sum) / denom
        metrics[f"acc/{key}"] = float(num_correct) / denom
        metrics[f"tokens/{key}"] = float(count)

    for name, row in rows.items():
        loss_sum, ce_sum, count, num_correct, pad_ce, pad_count, pad_correct = row
        metrics[f"loss/{name}"] = float(loss_sum) / max(float(count), 1.0)
        put(name, ce_sum, count, num_correct)
        put(f"{name}/response", ce_sum - pad_ce, count - pad_count, num_correct - pad_correct)
        put(f"{name}/pad", pad_ce, pad_count, pad_correct)
    return metrics


def padding_positions(x0: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Bool (B, L): EOS padding, i.e. an EOS whose left neighbour is also EOS.

    The first EOS after a response is the answer's own end (the model must learn where to stop)
    and counts as response; every EOS after it is padding (`data.pipeline.build_sft_example`).
    In CPT text an EOS separates documents and is never preceded by another, so nothing there
    is padding. Splits the metrics (`loss_metrics`) and weighs the loss (`pad_weight`).
    """
    is_eos = x0 == eos_id  # (B, L)
    previous = torch.zeros_like(is_eos)
    previous[:, 1:] = is_eos[:, :-1]
    return is_eos & previous


def diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    c: Corruption,
    weighting: str = "none",
    is_pad: torch.Tensor | None = None,
    pad_weight: float = 1.0,
) -> LossTerms:
    """Cross-entropy of logits (B, L, V) against x0 at the supervised positions of `c`.

    Only the supervised rows are gathered (N, V) before the cross-entropy, so no (B, L, V)
    intermediate beyond the logits exists; they are cast to float32 after the gather.
    weighting:
      "none"  every supervised token weighs 1 (the public official code).
      "inv_t" M2T terms weigh 1/t of their example (the ELBO weight of the paper's equations);
              T2T and keep terms weigh 1. [design choice] The 1/t factor comes from the masked
              diffusion ELBO, whose only terms are the masked ones; noise and keep are an
              addition outside that bound, with no ratio to correct for, so they stay
              unweighted and their scale does not blow up for small t.
    An example with t = 0 has no masked position, so 1/t is never evaluated on a term. A
    micro-batch with no supervised token returns zero sums that are still part of the graph
    (backward works and gives zero gradients, as every rank must run backward).
    is_pad: optional bool (B, L) marking EOS padding (`padding_positions`); it splits the
    logged figures (pad_* sums). None: no position is padding.
    pad_weight: loss weight of every supervised padding position (1 = the official code, every
    position alike), on top of `weighting`. [design choice, issue 26] In a short SFT chat most
    of a 32-token block is EOS padding: ~10 of the ~13 supervised positions of a 2-digit
    addition chat. docs/learning.md measured that this padding, not the model or the
    objective, made the tiny model learn several times slower; a small weight keeps the model
    predicting EOS there (it is learnt in a few steps either way) while the answer tokens get
    the gradient. The sums are still divided by the count of supervised tokens.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if logits.shape[:2] != x0.shape or c.xt.shape != x0.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, L, V) with x0 (B, L)")
    assert (
        not (c.is_masked & c.is_noised).any()
        and not ((c.is_masked | c.is_noised) & c.is_kept).any()
    )
    idx = c.supervised.nonzero(as_tuple=True)
    selected = logits[idx].float()  # (N, V)
    target = x0[idx]  # (N,)
    ce = F.cross_entropy(selected, target, reduction="none")  # (N,)
    is_correct = selected.detach().argmax(-1) == target  # (N,)
    weight = torch.ones_like(ce)  # (N,)
    is_m2t = c.is_masked[idx]  # (N,)
    if weighting == "inv_t":
        inv_t = 1.0 / c.t.to(ce.device, torch.float32)[idx[0]]  # (N,)
        weight = torch.where(is_m2t, inv_t, weight)
    pad = is_pad[idx] if is_pad is not None else torch.zeros_like(is_correct)  # (N,)
    if pad_weight != 1.0:
        weight = torch.where(pad, weight * pad_weight, weight)
    weighted = ce * weight  # (N,)

    def part(is_part: torch.Tensor) -> LossPart:
        is_part_pad = is_part & pad
        return LossPart(
            loss_sum=(weighted * is_part).sum(),
            ce_sum=(ce.detach() * is_part).sum(),
            count=is_part.sum(),
            num_correct=(is_correct & is_part).sum(),
            pad_ce_sum=(ce.detach() * is_part_pad).sum(),
            pad_count=is_part_pad.sum(),
            pad_num_correct=(is_correct & is_part_pad).sum(),
        )

    return LossTerms(m2t=part(is_m2t), t2t=part(c.is_noised[idx]), keep=part(c.is_kept[idx]))


def micro_batch_loss(
    local_sum: torch.Tensor,
    global_count: torch.Tensor | int,
    world_size: int,
    accumulation_steps: int,
) -> torch.Tensor:
    """The loss to hand to DeepSpeed's `engine.backward` for one micro-batch.

    Returns local_sum * world_size * accumulation_steps / global_count.

    Derivation. Let S_{r,m} be the loss sum of micro-batch m on rank r, W ranks, G accumulation
    steps, N = sum_{r,m} count_{r,m} the global count (all-reduced before the first backward of
    the step, identical on every rank). DeepSpeed scales each micro-batch loss by 1/G before
    backward (`scale_wrt_gas`, its default) and averages gradients over the W data-parallel
    ranks, so with ell_{r,m} the value returned here the applied gradient is
        (1/W) sum_r sum_m (1/G) grad ell_{r,m}
      = (1/W) sum_r sum_m (1/G) (W G / N) grad S_{r,m}
      = grad (sum_{r,m} S_{r,m}) / N,
    the gradient of the per-token mean over the whole optimizer step, the same for any split of
    the global batch into ranks and micro-batches. A step with N = 0 returns 0 * local_sum
    (zero gradient, graph kept).
    """
    scale = world_size * accumulation_steps
    if isinstance(global_count, torch.Tensor):
        denom = global_count.to(local_sum.device, local_sum.dtype).clamp_min(1)
    else:
        denom = float(max(global_count, 1))
    return local_sum * scale / denom


def expert_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): bias + rate * sign(mean(load) - load).

    bias, load (..., E): selection bias and tokens routed to each expert over the last step
    (leading dims, e.g. layers, are independent). Overloaded experts move down by `rate`,
    underloaded ones up, experts exactly at the mean stay. Returns a new tensor of bias's dtype.
    """
    load = load.to(bias.device, torch.float32)
    step = torch.sign(load.mean(-1, keepdim=True) - load)  # (..., E)
    return (bias.float() + rate * step).to(bias.dtype)


def load_balance_aux_loss(
    router_scores: torch.Tensor,
    topk_idx: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Optional auxiliary balance loss sum_i f_i P_i (Switch Transformer, DeepSeek-V3 form).

    router_scores (T, E): the router's unbiased scores (sigmoid or softmax); topk_idx (T, K):
    the experts chosen per token.
        f_i = E / (K T) * #{tokens routed to i}   (no gradient; 1 for every expert when balanced)
        P_i = (1 / T) sum_t s_{t,i} / sum_j s_{t,j}   (scores normalised per token)
    The result is 1 at perfect balance and up to E when every token goes to the same experts.
    It is a mean, not a (sum, count) pair: the caller adds coef * aux to the micro-batch loss
    as is, and DeepSpeed's averaging over ranks and micro-batches makes it the step mean.
    Returns a float32 scalar with gradient through the scores.
    """
    num_tokens, top_k = topk_idx.shape
    if num_tokens == 0:
        return router_scores.float().sum() * 0.0
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts)  # (E,)
    f = counts.float() * num_experts / (top_k * num_tokens)  # (E,)
    scores = router_scores.float()
    p = (scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)).mean(0)  # (E,)
    return (f.to(p.device) * p).sum()
