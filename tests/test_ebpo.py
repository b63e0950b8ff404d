"""EBPO objective and group advantages (SPEC section 5): hand-worked numbers and exact properties
of the ELBO ratio on the tiny model (ratio 1 at the first update, block locality, zero gradients).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from rl_reference import advantage_stats, response_mask_from_eos, reward_stats, sequence_elbo

from llada_train.elbo import (
    block_log_probs,
    elbo_noise,
    elbo_terms,
    level_weights,
    sequence_log_ratio,
    stack_t,
)
from llada_train.rl.advantages import group_advantages, has_signal, zero_variance_fraction
from llada_train.rl.loop import choose_groups, collect_rollouts, step_prompt_indices
from llada_train.rl.objectives import OBJECTIVES, ebpo_loss, grpo_loss, k3_kl

MASK, EOS = 95, 94  # tiny vocabulary of 96 (conftest.tiny_config); real tokens are < 90
BLOCK = 8


def rl_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (3, 24) = [prompt ; response ending in EOS ; EOS padding] and its response mask.

    Blocks of 8: block 0 holds prompt and response in rows 0 and 2, the prompt spills into
    block 1 in row 1.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 90, (3, 24), generator=g)  # (B, L)
    prompt_lengths = torch.tensor([5, 10, 3])
    eos_at = torch.tensor([21, 23, 15])  # last response token; after it: padding
    pos = torch.arange(24)[None]
    x0 = torch.where(pos >= eos_at[:, None], EOS, x0)
    return x0, response_mask_from_eos(x0, prompt_lengths, EOS)


# ---------------------------------------------------------------------------------- advantages
def test_group_advantages_hand_group():
    # rewards [1, 0, 0, 1]: mean 0.5; population std sqrt(mean((+-0.5)^2)) = 0.5
    # -> (r - 0.5) / 0.5 = [1, -1, -1, 1]. (Sample std would be sqrt(1/3) = 0.577 -> +-0.866.)
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(group_advantages(r, eps=0.0), torch.tensor([[1.0, -1.0, -1.0, 1.0]]))
    # default eps: 0.5 / (0.5 + 1e-6)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * (0.5 / 0.500001)
    torch.testing.assert_close(group_advantages(r), expected, rtol=0, atol=1e-7)
    # flat input with group size; second group [3, 1, 2, 2]: mean 2, std sqrt(2/4) -> [sqrt 2, ..]
    flat = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0])
    s2 = math.sqrt(2.0)
    torch.testing.assert_close(
        group_advantages(flat, 4, eps=0.0),
        torch.tensor([[1.0, -1.0, -1.0, 1.0], [s2, -s2, 0.0, 0.0]]),
    )
    # no std scaling: r - mean
    assert torch.equal(
        group_advantages(flat, 4, scale_std=False),
        torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]),
    )
    # a zero-variance group gets A = 0 (0 / (0 + eps))
    assert torch.equal(group_advantages(torch.ones(1, 4)), torch.zeros(1, 4))
    with pytest.raises(ValueError):
        group_advantages(flat, 3)


def test_reward_and_advantage_stats():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_fraction(r, 4) == pytest.approx(2 / 3)  # groups 2 and 3
    stats = reward_stats(r, 4)
    assert stats["reward/mean"] == pytest.approx(0.5)
    assert stats["reward/any_positive_fraction"] == pytest.approx(2 / 3)  # groups 1 and 2
    a = advantage_stats(group_advantages(r, 4, eps=0.0))
    assert a["advantage/nonzero_fraction"] == pytest.approx(4 / 12)
    assert a["advantage/mean"] == pytest.approx(0.0)


def test_dynamic_sampling_choice_hand_cases():
    """DAPO dynamic sampling keeps the groups with reward variance, in sampling order, and fills
    up with zero-variance ones only when too few have it."""
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0, 1.0], [0.0, 0.25]])
    assert has_signal(r).tolist() == [True, False, False, True, True]
    groups = ["a", "b", "c", "d", "e"]
    signal = has_signal(r).tolist()
    assert choose_groups(groups, signal, 2) == ["a", "d"]
    assert choose_groups(groups, signal, 3) == ["a", "d", "e"]
    assert choose_groups(groups, signal, 4) == ["a", "b", "d", "e"]  # one filler, in order
    assert choose_groups(groups, signal, 5) == groups  # the plain loop: every group, same order
    assert choose_groups(["b", "c"], [False, False], 1) == ["b"]
    with pytest.raises(ValueError, match="need 6 groups"):
        choose_groups(groups, signal, 6)
    with pytest.raises(ValueError, match="signal flags"):
        choose_groups(groups, signal[:3], 2)


def test_collect_rollouts_rounds_prompts_and_seeds(monkeypatch):
    """Which prompts and seeds each round of dynamic sampling uses, when it stops, what it keeps
    and what it counts. The sampler and the reward are replaced by stand-ins that record their
    calls (the real ones run end to end in tests/test_rl.py); prompt i's group has reward
    variance iff i is in SIGNAL."""
    from omegaconf import OmegaConf

    import llada_train.rl.loop as loop
    from llada_train.corruption import example_seed

    SIGNAL = {3, 8, 11, 17}
    calls = []

    def fake_rollout(model, ids, s_cfg, prompts, group_size, dual_groups, seed, device):
        calls.append(([p[0] for p in prompts], seed, dual_groups))
        completions = [[p[0], k] for p in prompts for k in range(group_size)]
        flags = [g < dual_groups for g in range(len(prompts)) for _ in range(group_size)]
        return completions, flags, ["stats"]

    def fake_score(names, texts, examples, max_workers):
        rewards = []
        for text, example in zip(texts, examples, strict=True):
            k = int(text.split()[1])
            rewards.append(float(k == 0) if example["prompt_ids"][0] in SIGNAL else 1.0)
        return rewards, 0

    class Decoder:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    monkeypatch.setattr(loop, "rollout", fake_rollout)
    monkeypatch.setattr(loop, "score_batch", fake_score)
    records = [{"prompt_ids": [i], "reward": "math"} for i in range(20)]

    def collect(rounds, step, rank, per_rank=2, world=2):
        calls.clear()
        cfg = OmegaConf.create({"seed": 5, "rollout": {
            "group_size": 3, "max_rounds": rounds, "prompts_per_step": per_rank * world,
            "dual_mode_fraction": 0.5, "reward_workers": 1}})  # fmt: skip
        out = collect_rollouts(
            None, None, Decoder(), None, records, cfg, step, rank, per_rank, "cpu"
        )
        for r, (prompts, seed, dual) in enumerate(calls):
            order = step_prompt_indices(len(records), step * rounds + r, per_rank * world, 5)
            assert prompts == order[rank * per_rank : (rank + 1) * per_rank]
            assert seed == example_seed(5, step, rank, r) and dual == 1
        return out, [p for prompts, _, _ in calls for p in prompts]

    # off (R = 1): one round, the plain loop's prompts, every group kept
    out, seen = collect(1, step=3, rank=1)
    assert out.rounds == 1 and [e["prompt_ids"][0] for e in out.examples[::3]] == seen
    # R rounds at most, until this rank holds 2 groups with signal; kept groups in sampling order
    branches = set()
    for rounds, step, rank in [(8, 0, 0), (8, 0, 1), (8, 4, 1), (2, 1, 0), (2, 2, 1)]:
        out, seen = collect(rounds, step, rank)
        hits = [p for p in seen if p in SIGNAL]
        kept = [e["prompt_ids"][0] for e in out.examples[::3]]
        assert out.rounds == len(calls) <= rounds and out.sampled_groups == len(seen) == 2 * len(
            calls
        )
        if len(hits) >= 2:  # stopped at the round that found the second one
            branches.add("stopped")
            assert kept == hits[:2] and sum(p in SIGNAL for p in seen[:-2]) < 2
        else:  # every round ran; zero-variance groups fill up, in sampling order
            branches.add("filled")
            fillers = [p for p in seen if p not in SIGNAL][: 2 - len(hits)]
            assert out.rounds == rounds and kept == [p for p in seen if p in hits + fillers]
        assert out.sampled_signal_groups == len(hits)
        assert out.rewards == [
            r for p in kept for r in ([1.0, 0.0, 0.0] if p in SIGNAL else [1.0] * 3)
        ]
        assert len(out.sampled_rewards) == 3 * len(seen) and out.stats == ["stats"] * out.rounds
    assert branches == {"stopped", "filled"}  # both paths are exercised


# ------------------------------------------------------------------------------- noise, weights
def test_response_mask_from_eos():
    x0 = torch.tensor([[7, 7, 3, EOS, EOS, EOS], [7, 3, 3, 3, 3, 3]])
    mask = response_mask_from_eos(x0, torch.tensor([2, 1]), EOS)
    # row 0: response = positions 2..3 (EOS included), 4..5 padding; row 1: no EOS, runs to end
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]


def test_same_seeds_same_noise_and_stratification():
    x0, resp = rl_batch()
    seeds = [11, 12, 13]
    levels = elbo_noise(x0, resp, 4, seeds, MASK)
    again = elbo_noise(x0, resp, 4, seeds, MASK)
    for a, b in zip(levels, again, strict=True):
        assert torch.equal(a.xt, b.xt) and torch.equal(a.t, b.t)
    other = elbo_noise(x0, resp, 4, [21, 22, 23], MASK)
    assert not all(torch.equal(a.xt, b.xt) for a, b in zip(levels, other, strict=True))
    t = stack_t(levels)  # (N, B)
    # exactly one t of each sequence in each interval (n/N, (n+1)/N]
    n = torch.arange(4, dtype=torch.float64)[:, None]
    assert ((t > n / 4) & (t <= (n + 1) / 4)).all()
    for level in levels:
        assert not (level.is_masked & ~resp).any()  # prompt and padding never masked
        assert torch.equal(level.xt == MASK, level.is_masked)
        assert torch.equal(level.xt[~level.is_masked], x0[~level.is_masked])
    # the draws of a position do not depend on L: padding the batch keeps the noise
    wide = torch.cat((x0, torch.full((3, 8), EOS)), dim=1)
    wide_resp = torch.cat((resp, torch.zeros(3, 8, dtype=torch.bool)), dim=1)
    for a, b in zip(levels, elbo_noise(wide, wide_resp, 4, seeds, MASK), strict=True):
        assert torch.equal(a.xt, b.xt[:, :24]) and torch.equal(a.t, b.t)
    # not stratified: midpoints (n + 1/2) / N for every sequence
    mids = stack_t(elbo_noise(x0, resp, 4, seeds, MASK, stratified=False))
    assert torch.equal(mids, ((n + 0.5) / 4).expand(4, 3))


def test_masked_share_follows_t():
    # t = 1 masks every response token: N = 1 stratified gives t in (0, 1]; with many tokens the
    # masked share of each sequence is close to its t.
    x0 = torch.zeros(64, 400, dtype=torch.long)
    resp = torch.ones_like(x0, dtype=torch.bool)
    (level,) = elbo_noise(x0, resp, 1, list(range(64)), MASK)
    share = level.is_masked.double().mean(1)
    assert (share - level.t).abs().max() < 0.1


def test_level_weights_hand():
    t = torch.tensor([[0.25, 0.5], [0.75, 1.0]], dtype=torch.float64)  # (N=2, B=2)
    # w = 1 / (N t): 1/(2*0.25) = 2, 1/(2*0.5) = 1, 1/(2*0.75) = 2/3, 1/(2*1) = 0.5
    w = level_weights(t, torch.tensor([4, 2]), "elbo")
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0], [2 / 3, 0.5]]))
    # divided by |y| = [4, 2]: [[0.5, 0.5], [1/6, 0.25]]
    w = level_weights(t, torch.tensor([4, 2]), "elbo_length")
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5], [1 / 6, 0.25]]))
    with pytest.raises(ValueError):
        level_weights(t, torch.tensor([4, 2]), "uniform")


def test_block_log_probs_and_elbo_hand():
    # V = 2, logits [0, log 3] everywhere: p(token 0) = 1/4, p(token 1) = 3/4.
    logits = torch.tensor([0.0, math.log(3.0)]).expand(1, 5, 2)  # (B=1, L=5, V=2)
    x0 = torch.tensor([[0, 1, 1, 0, 1]])
    is_masked = torch.tensor([[True, True, False, True, True]])
    # block_length 2 -> K = 3 blocks {0,1} {2,3} {4}:
    #   block 0: log 1/4 + log 3/4; block 1: log 1/4 (position 2 not masked); block 2: log 3/4
    lq, l3q = math.log(0.25), math.log(0.75)
    terms = block_log_probs(logits, x0, is_masked, 2)
    torch.testing.assert_close(terms, torch.tensor([[lq + l3q, lq, l3q]]))
    # two levels with the same terms, w = [2, 0.5] -> ELBO = 2.5 * (2 lq + 2 l3q)
    both = torch.stack((terms, terms))  # (N=2, B=1, K=3)
    elbo = sequence_elbo(both, torch.tensor([[2.0], [0.5]]))
    torch.testing.assert_close(elbo, torch.tensor([2.5 * (2 * lq + 2 * l3q)]))
    # log ratio against terms lower by 1 in every block: sum_n w_n * K * 1 = 2.5 * 3
    lr = sequence_log_ratio(both, both - 1.0, torch.tensor([[2.0], [0.5]]))
    torch.testing.assert_close(lr, torch.tensor([7.5]))


# ----------------------------------------------------------------------------- clipped surrogate
def test_clipping_hand_cases():
    # eps_low 0.2, eps_high 0.28: clip range [0.8, 1.28]. Per sequence (rho, A):
    #   (1.5, +2): min(3.0, 1.28*2 = 2.56) = 2.56 clipped   -> loss -2.56, d loss/d log rho = 0
    #   (0.5, +2): min(1.0, 0.8*2 = 1.6)   = 1.0            -> loss -1.0,  grad -rho A = -1.0
    #   (0.5, -1): min(-0.5, -0.8)         = -0.8 clipped   -> loss  0.8,  grad 0
    #   (1.5, -1): min(-1.5, -1.28)        = -1.5           -> loss  1.5,  grad -rho A = 1.5
    #   (1.1, +1): inside the range        = 1.1            -> loss -1.1,  grad -1.1
    # loss_sum = -2.56 - 1.0 + 0.8 + 1.5 - 1.1 = -2.36; count 5; clip fraction 2/5
    rho = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1], dtype=torch.float64)
    log_ratio = rho.log().requires_grad_()
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss_sum, count, stats = ebpo_loss(log_ratio, adv, 0.2, 0.28)
    torch.testing.assert_close(loss_sum, torch.tensor(-2.36, dtype=torch.float64))
    assert int(count) == 5
    loss_sum.backward()
    torch.testing.assert_close(
        log_ratio.grad, torch.tensor([0.0, -1.0, 0.0, 1.5, -1.1], dtype=torch.float64)
    )
    assert log_ratio.grad[0] == 0 and log_ratio.grad[2] == 0  # exactly zero where clipped
    metrics = stats
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5)
    assert metrics["ratio_min"] == pytest.approx(0.5) and metrics["ratio_max"] == pytest.approx(1.5)
    # approx KL = mean((rho - 1) - log rho) >= 0
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5, 1.1)) / 5
    assert metrics["approx_kl"] == pytest.approx(expected_kl)


def test_grpo_token_mean_and_registry():
    # same surrogate, weighted by |y| = [3, 1]: rho = [1.5, 1.0], A = [2, -1]
    #   seq 0: clipped 2.56 -> -2.56 * 3 = -7.68; seq 1: 1.0 * -1 = -1 -> +1 * 1 = 1
    # loss_sum = -6.68, count = 4 tokens
    log_ratio = torch.tensor([math.log(1.5), 0.0], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss_sum, count, _ = grpo_loss(log_ratio, adv, response_len=torch.tensor([3, 1]))
    torch.testing.assert_close(loss_sum, torch.tensor(-6.68, dtype=torch.float64))
    assert int(count) == 4
    assert OBJECTIVES["ebpo"] is ebpo_loss and OBJECTIVES["grpo"] is grpo_loss
    with pytest.raises(ValueError):
        grpo_loss(log_ratio, adv)


def test_k3_kl_small_log_ratio_float32():
    # k3(x) = x^2/2 + x^3/6 + ...: at x = 1e-6 it is 5.0e-13 (+ 1.7e-19). exp(x) - x - 1 in
    # float32 read -6e-8 there (exp(1e-6) rounds to 1 + 9.5e-7); expm1(x) - x keeps the sign
    # and is within float32's spacing at 1e-6 (~1e-13) of the true value.
    x = torch.tensor([1e-6, -1e-6, 1e-4], dtype=torch.float32)
    k3 = k3_kl(x)
    assert (k3 >= 0).all()
    true = x.double() ** 2 / 2 + x.double() ** 3 / 6
    assert (k3.double() - true).abs().max() < 2e-13 + 1e-3 * true.max()
    assert k3[2].item() == pytest.approx(5.0e-9, rel=1e-3)


def test_group_advantages_reject_non_finite():
    with pytest.raises(ValueError, match="non-finite reward"):
        group_advantages(torch.tensor([[1.0, float("nan"), 0.0]]))


def test_k3_kl_hand_and_stats():
    # lr = log p_ref - log p_theta. lr = 0 -> exp(0) - 0 - 1 = 0 exactly;
    # lr = log 2 -> 2 - ln 2 - 1 = 0.3068528194400547; lr = -log 2 -> 0.5 + ln 2 - 1
    # = 0.1931471805599453 (ln 2 = 0.6931471805599453)
    lr = torch.tensor([0.0, math.log(2.0), -math.log(2.0)], dtype=torch.float64)
    k3 = k3_kl(lr)
    assert k3[0] == 0
    torch.testing.assert_close(
        k3[1:], torch.tensor([0.3068528194400547, 0.1931471805599453], dtype=torch.float64)
    )
    # added with kl_coef 0.5 to the surrogate of rho = 1, A = 0 (which is 0):
    zero = torch.zeros(3, dtype=torch.float64)
    loss_sum, _, stats = ebpo_loss(zero, zero, kl_terms=lr, kl_coef=0.5)
    torch.testing.assert_close(loss_sum, 0.5 * k3.sum())
    # off by default: kl_coef 0 adds nothing but the KL is still logged
    loss_sum, _, stats2 = ebpo_loss(
        torch.zeros(3, dtype=torch.float64), torch.zeros(3), kl_terms=lr
    )
    assert loss_sum == 0
    for st in (stats, stats2):  # the KL is logged whatever kl_coef
        assert st["kl"] == pytest.approx(float(k3.mean()))
        assert st["ratio_min"] == 1.0 == st["ratio_max"] and st["clip_fraction"] == 0.0
    # grpo logs the per-token mean: |y| = [1, 3, 0] -> (3 * k3[1]) / 4
    _, _, stats3 = grpo_loss(zero, zero, kl_terms=lr, response_len=torch.tensor([1, 3, 0]))
    assert stats3["kl"] == pytest.approx(3 * float(k3[1]) / 4)


# ---------------------------------------------------------------------- the tiny model end to end
def _model_terms(model, x0, resp, seeds, num_levels=3, grad=True):
    levels = elbo_noise(x0, resp, num_levels, seeds, MASK)
    with torch.set_grad_enabled(grad):
        terms = elbo_terms(model, x0, levels, BLOCK)  # (N, B, K)
    return terms, level_weights(stack_t(levels), resp.sum(1), "elbo"), levels


def test_ratio_is_exactly_one_at_first_update(tiny_model):
    x0, resp = rl_batch()
    seeds = [5, 6, 7]
    old = copy.deepcopy(tiny_model)
    new_terms, w, _ = _model_terms(tiny_model, x0, resp, seeds)
    old_terms, _, _ = _model_terms(old, x0, resp, seeds, grad=False)
    assert new_terms.shape == (3, 3, 3)  # (N, B, K = 24 / 8)
    assert (new_terms <= 0).all() and (new_terms < 0).any()
    log_ratio = sequence_log_ratio(new_terms, old_terms, w)
    assert torch.equal(log_ratio, torch.zeros(3))  # bit-exact: same weights, same noise
    _, _, stats = ebpo_loss(log_ratio, torch.tensor([1.0, -1.0, 0.5]))
    assert stats["ratio_min"] == 1.0 == stats["ratio_max"]
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    # other seeds draw other noise, hence other terms (the ratio only means something with CRN)
    other_terms, _, _ = _model_terms(old, x0, resp, [8, 9, 10], grad=False)
    assert not torch.equal(other_terms, old_terms)


def test_log_ratio_and_k3_of_models(tiny_model):
    # identical models: log ratio 0 and k3 0 exactly; a perturbed one: nonzero ratio, k3 > 0
    x0, resp = rl_batch(1)
    seeds = [1, 2, 3]
    twin = copy.deepcopy(tiny_model)
    terms, w, _ = _model_terms(tiny_model, x0, resp, seeds)
    twin_terms, _, _ = _model_terms(twin, x0, resp, seeds, grad=False)
    assert torch.equal(sequence_log_ratio(terms, twin_terms, w), torch.zeros(3))
    assert torch.equal(k3_kl(sequence_log_ratio(twin_terms, terms, w)), torch.zeros(3))
    with torch.no_grad():
        twin.lm_head.weight.add_(0.05 * torch.randn_like(twin.lm_head.weight))
    ref_terms, _, _ = _model_terms(twin, x0, resp, seeds, grad=False)
    lr = sequence_log_ratio(ref_terms, terms, w)  # log p_ref - log p_theta, grad via theta
    assert (lr != 0).all() and (k3_kl(lr) > 0).all()
    # the KL term has a gradient into the policy (the reference is detached)
    loss_sum, _, _ = ebpo_loss(torch.zeros(3), torch.zeros(3), kl_terms=lr, kl_coef=0.1)
    loss_sum.backward()
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0
    assert twin.lm_head.weight.grad is None


def test_zero_advantage_gives_zero_gradient(tiny_model):
    x0, resp = rl_batch(2)
    seeds = [3, 4, 5]
    old = copy.deepcopy(tiny_model)
    with torch.no_grad():  # theta != old so that rho != 1 and both branches are exercised
        tiny_model.lm_head.weight.add_(0.05 * torch.randn_like(tiny_model.lm_head.weight))
    terms, w, _ = _model_terms(tiny_model, x0, resp, seeds)
    old_terms, _, _ = _model_terms(old, x0, resp, seeds, grad=False)
    log_ratio = sequence_log_ratio(terms, old_terms, w)
    assert (log_ratio != 0).all()
    loss_sum, _, _ = ebpo_loss(log_ratio, torch.zeros(3))
    loss_sum.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # and a nonzero advantage does move the parameters
    tiny_model.zero_grad()
    loss_sum, _, _ = ebpo_loss(
        sequence_log_ratio(_model_terms(tiny_model, x0, resp, seeds)[0], old_terms, w),
        torch.tensor([1.0, -1.0, 0.5]),
    )
    loss_sum.backward()
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block", [1, 2])
def test_changing_block_b_changes_only_blocks_from_b(tiny_model, block):
    # The layout [xt ; x0]: noisy block b' sees noisy block b' and clean blocks < b'; clean block
    # c sees clean blocks <= c. Changing the tokens of block b changes noisy block b (its visible
    # tokens) and its targets, and clean blocks >= b; so the terms of blocks < b are bit-identical,
    # the term of block b changes, and the terms of blocks > b change too, because their noisy
    # copy attends to the clean block b (the context of block b' when decoding is every block
    # before it). The noise is the same: masks depend on seeds and the response mask only.
    x0, resp = rl_batch(3)
    seeds = [7, 8, 9]
    span = torch.zeros_like(resp)
    span[:, block * BLOCK : (block + 1) * BLOCK] = True
    changed = span & resp & (x0 != EOS)  # response tokens of block b (the EOS stays)
    x1 = torch.where(changed, (x0 + 1 + torch.arange(24) % 7) % 90, x0)
    row_changed = changed.any(1)  # (B,); block 2 of row 2 is padding only
    assert row_changed.any()
    terms, _, levels = _model_terms(tiny_model, x0, resp, seeds, grad=False)
    terms1, _, levels1 = _model_terms(tiny_model, x1, resp, seeds, grad=False)
    for a, b in zip(levels, levels1, strict=True):
        assert torch.equal(a.is_masked, b.is_masked)
    assert torch.equal(terms[:, :, :block], terms1[:, :, :block])  # bit-identical
    masked_per_block = torch.stack([lv.is_masked.view(3, 3, BLOCK).sum(-1) for lv in levels])
    has_masked = masked_per_block > 0  # (N, B, K)
    # block b: its term changes wherever it has a masked changed token
    masked_changed = torch.stack([(lv.is_masked & changed).any(1) for lv in levels])  # (N, B)
    assert masked_changed.any()
    assert (terms[..., block] != terms1[..., block])[masked_changed].all()
    # blocks after b of a changed row: change wherever they have a masked token (they see
    # clean block b); an unchanged row is bit-identical everywhere
    later = has_masked[..., block + 1 :] & row_changed[None, :, None]
    assert later.any() or block == 2  # block 2 is the last one
    assert (terms[..., block + 1 :] != terms1[..., block + 1 :])[later].all()
    assert torch.equal(terms[:, ~row_changed], terms1[:, ~row_changed])
    # blocks without a masked token contribute exactly 0
    assert (terms[~has_masked] == 0).all() and (terms1[~has_masked] == 0).all()
