"""Tests of `llada_train.losses`: the diffusion loss on hand-worked cases for both weightings,
the micro-batch scaling against a simulated DeepSpeed step, and MoE balancing."""

from __future__ import annotations

import math

import pytest
import torch

from llada_train.corruption import Corruption, corrupt, example_seed
from llada_train.losses import (
    diffusion_loss,
    expert_bias_update,
    load_balance_aux_loss,
    loss_metrics,
    micro_batch_loss,
    padding_positions,
)

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


def hand_case() -> tuple[torch.Tensor, torch.Tensor, Corruption]:
    """B = 2, L = 3, V = 3. Position 2 of each row is unsupervised with a huge logit on a wrong
    token (it would dominate the loss if counted).

    ex0, t = 0.5:  pos0 masked, label 0, logits [ln2, 0, 0] -> p = 2/4: CE ln2, argmax 0 right
                   pos1 noised, label 1, logits [ln2, 0, 0] -> p = 1/4: CE 2 ln2, argmax 0 wrong
    ex1, t = 0.25: pos0 masked, label 2, logits [0, ln3, 0] -> p = 1/5: CE ln5, argmax 1 wrong
                   pos1 kept,   label 1, logits [0, ln3, 0] -> p = 3/5: CE ln5 - ln3, right
    """
    x0 = torch.tensor([[0, 1, 2], [2, 1, 0]])
    logits = torch.tensor(
        [
            [[LN2, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, 100.0, 0.0]],
            [[0.0, LN3, 0.0], [0.0, LN3, 0.0], [0.0, 0.0, 100.0]],
        ],
        requires_grad=True,
    )
    c = Corruption(
        xt=torch.tensor([[9, 2, 2], [9, 1, 0]]),  # not read by the loss
        is_masked=torch.tensor([[True, False, False], [True, False, False]]),
        is_noised=torch.tensor([[False, True, False], [False, False, False]]),
        is_kept=torch.tensor([[False, False, False], [False, True, False]]),
        t=torch.tensor([0.5, 0.25]),
    )
    return x0, logits, c


def test_loss_hand_case_no_weighting() -> None:
    x0, logits, c = hand_case()
    terms = diffusion_loss(logits, x0, c, weighting="none")
    # m2t = ln2 + ln5 = ln10; t2t = 2 ln2; keep = ln5 - ln3; total = ln(10 * 4 * 5/3) = ln(200/3)
    assert terms.m2t.loss_sum.item() == pytest.approx(math.log(10))
    assert terms.t2t.loss_sum.item() == pytest.approx(2 * LN2)
    assert terms.keep.loss_sum.item() == pytest.approx(LN5 - LN3)
    assert terms.total_sum.item() == pytest.approx(math.log(200 / 3))
    assert (terms.m2t.count.item(), terms.t2t.count.item(), terms.keep.count.item()) == (2, 1, 1)
    assert terms.total_count.item() == 4 and terms.total_count.dtype == torch.int64
    correct = (terms.m2t.num_correct, terms.t2t.num_correct, terms.keep.num_correct)
    assert [n.item() for n in correct] == [1, 0, 1]
    terms.total_sum.backward()
    assert (logits.grad[:, 2] == 0).all()  # unsupervised positions get no gradient
    # d CE / d logits = softmax - onehot: ex1 pos0 = [1/5, 3/5, 1/5] - [0, 0, 1].
    assert torch.allclose(logits.grad[1, 0], torch.tensor([0.2, 0.6, -0.8]))


def test_loss_hand_case_inv_t_weights_m2t_only() -> None:
    x0, logits, c = hand_case()
    terms = diffusion_loss(logits, x0, c, weighting="inv_t")
    # m2t = ln2 / 0.5 + ln5 / 0.25 = 2 ln2 + 4 ln5 = ln 2500; t2t and keep unweighted.
    assert terms.m2t.loss_sum.item() == pytest.approx(math.log(2500))
    assert terms.t2t.loss_sum.item() == pytest.approx(2 * LN2)
    assert terms.keep.loss_sum.item() == pytest.approx(LN5 - LN3)
    assert terms.total_sum.item() == pytest.approx(math.log(2500 * 4 * 5 / 3))
    assert terms.m2t.ce_sum.item() == pytest.approx(math.log(10))  # logged CE stays unweighted
    terms.total_sum.backward()
    # ex1 pos0 weighs 1/0.25 = 4: 4 * [0.2, 0.6, -0.8]; ex0 pos1 (noised) weighs 1.
    assert torch.allclose(logits.grad[1, 0], torch.tensor([0.8, 2.4, -3.2]))
    assert torch.allclose(logits.grad[0, 1], torch.tensor([0.5, -0.75, 0.25]))


def test_loss_metrics_from_stats() -> None:
    x0, logits, c = hand_case()
    stats = diffusion_loss(logits, x0, c, weighting="inv_t").stats()
    assert stats.shape == (21,) and not stats.requires_grad
    m = loss_metrics(stats + stats)  # e.g. summed over two micro-batches: same per-token figures
    assert m["loss/m2t"] == pytest.approx(math.log(2500) / 2)
    assert m["ce/m2t"] == pytest.approx(math.log(10) / 2)
    assert m["acc/m2t"] == 0.5 and m["acc/t2t"] == 0.0 and m["acc/keep"] == 1.0
    assert m["tokens/total"] == 8.0 and m["acc/total"] == 0.5
    assert m["ce/total"] == pytest.approx(math.log(200 / 3) / 4)


def test_response_and_padding_figures_hand_case() -> None:
    """The metrics split into response and EOS padding (issue 17 item 5); the loss is unchanged.
    Marked as padding: ex0 pos1 (T2T, CE 2 ln2, wrong) and ex1 pos0 (M2T, CE ln5, wrong)."""
    x0, logits, c = hand_case()
    is_pad = torch.tensor([[False, True, False], [True, False, False]])
    terms = diffusion_loss(logits, x0, c, weighting="none", is_pad=is_pad)
    plain = diffusion_loss(logits, x0, c, weighting="none")
    assert terms.total_sum.item() == pytest.approx(plain.total_sum.item())
    m = loss_metrics(terms.stats())
    assert m["tokens/m2t/response"] == 1.0 and m["acc/m2t/response"] == 1.0
    assert m["ce/m2t/response"] == pytest.approx(LN2)
    assert m["tokens/m2t/pad"] == 1.0 and m["acc/m2t/pad"] == 0.0
    assert m["ce/m2t/pad"] == pytest.approx(LN5)
    assert m["tokens/t2t/response"] == 0.0 and m["ce/t2t/pad"] == pytest.approx(2 * LN2)
    assert m["tokens/total/response"] == 2.0 and m["acc/total/response"] == 1.0
    assert m["ce/total/response"] == pytest.approx((LN2 + LN5 - LN3) / 2)
    assert m["acc/m2t"] == 0.5  # the unsplit figure is unchanged


def test_pad_weight_scales_padding_terms_only() -> None:
    """pad_weight 0.1 (issue 26): padding here is ex0 pos1 (T2T, CE 2 ln2) and ex1 pos0 (M2T, CE
    ln5): m2t = ln2 + 0.1 ln5, t2t = 0.1 * 2 ln2, keep = ln5 - ln3 unchanged; the logged CE and
    the counts stay unweighted. With inv_t the factors multiply: ex1 pos0 weighs 0.1 / 0.25."""
    x0, logits, c = hand_case()
    is_pad = torch.tensor([[False, True, False], [True, False, False]])
    terms = diffusion_loss(logits, x0, c, weighting="none", is_pad=is_pad, pad_weight=0.1)
    assert terms.m2t.loss_sum.item() == pytest.approx(LN2 + 0.1 * LN5)
    assert terms.t2t.loss_sum.item() == pytest.approx(0.2 * LN2)
    assert terms.keep.loss_sum.item() == pytest.approx(LN5 - LN3)
    assert terms.m2t.ce_sum.item() == pytest.approx(math.log(10))
    assert terms.total_count.item() == 4
    inv_t = diffusion_loss(logits, x0, c, weighting="inv_t", is_pad=is_pad, pad_weight=0.1)
    assert inv_t.m2t.loss_sum.item() == pytest.approx(LN2 / 0.5 + 0.1 * LN5 / 0.25)
    terms.total_sum.backward()
    assert torch.allclose(logits.grad[1, 0], 0.1 * torch.tensor([0.2, 0.6, -0.8]))


def test_padding_positions() -> None:
    """An EOS is padding only after another EOS: the answer's own EOS is response."""
    x0 = torch.tensor([[5, 0, 0, 0], [0, 0, 7, 0]])
    expected = torch.tensor([[False, False, True, True], [False, True, False, False]])
    assert torch.equal(padding_positions(x0, eos_id=0), expected)


def test_low_precision_logits_give_fp32_sums() -> None:
    x0, logits, c = hand_case()
    terms = diffusion_loss(logits.detach().bfloat16(), x0, c)
    assert terms.total_sum.dtype == torch.float32
    assert terms.total_sum.item() == pytest.approx(math.log(200 / 3), rel=1e-2)


def test_empty_supervision_still_backpropagates() -> None:
    x0, logits, c = hand_case()
    nothing = torch.zeros_like(c.is_masked)
    empty = Corruption(c.xt, nothing, nothing, nothing, c.t)
    terms = diffusion_loss(logits, x0, empty, weighting="inv_t")
    assert terms.total_sum.item() == 0.0 and terms.total_count.item() == 0
    micro_batch_loss(terms.total_sum, 0, 2, 2).backward()
    assert logits.grad is not None and (logits.grad == 0).all()
    assert loss_metrics(terms.stats())["loss/total"] == 0.0


def test_unknown_weighting_raises() -> None:
    x0, logits, c = hand_case()
    with pytest.raises(ValueError, match="inv_t"):
        diffusion_loss(logits, x0, c, weighting="1/t")


def test_micro_batch_loss_matches_global_token_mean_under_deepspeed_scaling() -> None:
    # 2 ranks x 2 accumulation steps with uneven micro-batches (1, 3 | 2, 2 examples) and
    # random corruption, so local counts differ. DeepSpeed applies grad = mean over ranks of
    # sum over micro-batches of grad(loss / accumulation_steps); this must equal the gradient
    # of (sum of every supervised token's loss) / (global count) on the whole batch.
    vocab, dim, length, world, accum = 12, 4, 10, 2, 2
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(dim, vocab, generator=g, requires_grad=True)
    kw = dict(t_min=0.1, t_max=0.9, noise_max=0.3, keep_share=0.5, mask_id=1, vocab_size=vocab)
    micro = []  # [rank][step] -> (features, x0, corruption)
    index = 0
    for rank, sizes in enumerate([(1, 3), (2, 2)]):
        steps = []
        for size in sizes:
            x0 = torch.randint(2, vocab, (size, length), generator=g)
            maskable = torch.rand(size, length, generator=g) < 0.8
            seeds = [example_seed(0, 0, rank, index + i) for i in range(size)]
            index += size
            c = corrupt(x0, maskable, seeds, special_ids=(0, 1), **kw)
            steps.append((torch.randn(size, length, dim, generator=g), x0, c))
        micro.append(steps)

    def terms(features, x0, c):
        return diffusion_loss(features @ weight, x0, c, weighting="inv_t")

    # Reference: one process, whole batch, per-token mean.
    all_terms = [terms(*mb) for steps in micro for mb in steps]
    global_count = sum(t.total_count for t in all_terms)
    reference = sum(t.total_sum for t in all_terms) / global_count
    (ref_grad,) = torch.autograd.grad(reference, weight)

    # Simulated DeepSpeed: each rank accumulates grad(loss / accum), then ranks are averaged.
    value, grad = 0.0, torch.zeros_like(weight)
    for steps in micro:
        rank_grad = torch.zeros_like(weight)
        for mb in steps:
            loss = micro_batch_loss(terms(*mb).total_sum, global_count, world, accum)
            (g_mb,) = torch.autograd.grad(loss / accum, weight)
            rank_grad += g_mb
            value += loss.item() / accum / world
        grad += rank_grad / world
    assert global_count.item() > 20
    assert value == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    # An int count gives the same loss as a tensor count.
    first = terms(*micro[0][0]).total_sum
    assert micro_batch_loss(first, int(global_count), world, accum).item() == pytest.approx(
        micro_batch_loss(first, global_count, world, accum).item()
    )


def test_expert_bias_update_moves_towards_balance() -> None:
    # load mean 6: expert 0 overloaded (down), 1 underloaded (up), 2 and 3 at the mean (stay).
    bias = torch.zeros(4)
    new = expert_bias_update(bias, torch.tensor([10, 2, 6, 6]), rate=0.01)
    assert torch.allclose(new, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    assert torch.equal(bias, torch.zeros(4))  # returns a new tensor
    # Per-layer rows are independent.
    layers = expert_bias_update(torch.zeros(2, 3), torch.tensor([[3, 0, 0], [1, 1, 1]]), 0.1)
    assert torch.allclose(layers, torch.tensor([[-0.1, 0.1, 0.1], [0.0, 0.0, 0.0]]))


def test_expert_bias_update_balances_a_skewed_router() -> None:
    # 4096 tokens, 8 experts, top-2 on score + bias, expert e favoured by an offset 0.1 e:
    # the most loaded expert starts near 3x the mean; 300 updates bring it near the mean.
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4096, 8, generator=g) * 0.5 + torch.arange(8) * 0.1  # (T, E)
    bias = torch.zeros(8)

    def load(b: torch.Tensor) -> torch.Tensor:
        topk = (scores + b).topk(2, dim=-1).indices  # (T, 2)
        return torch.bincount(topk.reshape(-1), minlength=8).float()

    start = load(bias)
    for _ in range(300):
        bias = expert_bias_update(bias, load(bias), rate=0.002)
    end = load(bias)
    assert start.max() / start.mean() > 2.5
    assert end.max() / end.mean() < 1.1
    assert bias[7] < bias[0]  # the favoured expert was pushed down


def test_load_balance_aux_loss_hand_case() -> None:
    # Balanced: token 0 -> expert 0, token 1 -> expert 1 (K = 1, T = 2, E = 2): f = [1, 1],
    # P = [0.5, 0.5] from the normalised scores [[.75, .25], [.25, .75]]: loss = 1.
    balanced = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert load_balance_aux_loss(balanced, torch.tensor([[0], [1]]), 2).item() == pytest.approx(1)
    # Collapsed, sigmoid scores [0.6, 0.2] for both tokens: normalised [0.75, 0.25];
    # f = [2, 0], P = [0.75, 0.25]: loss = 1.5. Gradient of 2 * mean_t s0 / (s0 + s1):
    # d/ds0 = (2 / 2) * 0.2 / 0.8^2 = 0.3125, d/ds1 = -(2 / 2) * 0.6 / 0.8^2 = -0.9375.
    scores = torch.tensor([[0.6, 0.2], [0.6, 0.2]], requires_grad=True)
    loss = load_balance_aux_loss(scores, torch.tensor([[0], [0]]), 2)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert torch.allclose(scores.grad, torch.tensor([[0.3125, -0.9375], [0.3125, -0.9375]]))
