"""Tests of the shared sampler (SPEC section 4): every rule on a scripted model, by hand.

A `ScriptedLM` decides the logits of each call from the call index and the input tokens, so
each rule of joint threshold decoding is checked on numbers worked out in the comments. The
cache, the batching and the sampling are checked on a tiny random LLaDA2-MoE: cached and
uncached decoding must take identical decisions, a batch must equal single calls.

Legend: M = mask id (63), E = EOS id (62), bl = block_length, P = prompt length; columns are
real positions (no padding in the scripted tests, which run batch 1 or equal prompt lengths).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from llada_train import CONF_DIR
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.sampler import (
    PRESETS,
    Sampler,
    SamplerConfig,
    joint_threshold_step,
    sample_candidates,
    sampler_config,
)
from tests.conftest import tiny_config

V, M, E = 64, 63, 62
NEG = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core machine a second intra-op
    thread waits on a descheduled one and these tests ran 20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def p_logits(token: int, p: float, alt: int = 50) -> dict[int, float]:
    """Logits giving `token` probability p (the rest to `alt`; p > 0.5 keeps `token` the argmax).

    p = 1 gives exactly 1.0 (all other logits are -inf).
    """
    if p >= 1.0:
        return {token: 0.0}
    return {token: math.log(p / (1 - p)), alt: 0.0}


class ScriptedLM:
    """rule(call_index, tokens of one row) -> {position: {token: logit}}; others: token 1."""

    def __init__(self, rule):
        self.rule = rule
        self.calls: list[torch.Tensor] = []  # input ids of each call

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        call = len(self.calls)
        self.calls.append(input_ids.clone())
        out = torch.full((*input_ids.shape, V), NEG)  # (B, L, V)
        out[..., 1] = 0.0
        for b in range(input_ids.shape[0]):
            for pos, logits in self.rule(call, input_ids[b].tolist()).items():
                out[b, pos] = NEG
                for tok, val in logits.items():
                    out[b, pos, tok] = val
        return out


def scripted(rule, **cfg) -> tuple[Sampler, ScriptedLM]:
    fake = ScriptedLM(rule)
    config = SamplerConfig(**{"block_length": 4, "use_cache": False, **cfg})
    return Sampler(fake, mask_id=M, eos_id=E, config=config), fake


# ---------------------------------------------------------------------------- M2T
def test_threshold_is_strict_and_fallback_fills_one():
    # Every position: tokens 10 and 11 tie, conf = 0.5 exactly. Threshold 0.5: nothing passes,
    # so each forward sets one token (the one torch.topk(k=1) picks among the tied masks, as
    # the official code); 4 fills + 1 confirmation.
    tie = lambda call, toks: {p: {10: 0.0, 11: 0.0} for p in range(len(toks))}  # noqa: E731
    sampler, fake = scripted(tie, threshold=0.5, editing_threshold=None, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[10, 10, 10, 10]]
    assert out.stats.forwards_per_row == [5]
    expected, block = [], [M, M, M, M]
    for _ in range(4):
        expected.append(list(block))
        conf = torch.tensor([0.5 if t == M else float("-inf") for t in block])
        block[int(conf.topk(1).indices[0])] = 10
    assert [c[0, 4:].tolist() for c in fake.calls] == [*expected, [10, 10, 10, 10]]
    # Just below 0.5 every mask passes at once: 1 forward + 1 confirmation.
    sampler, _ = scripted(tie, threshold=0.4999, editing_threshold=None, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.stats.forwards_per_row == [2] and out.stats.num_m2t == 4


def test_fallback_sets_the_single_most_confident_mask():
    # conf 0.6, 0.9, 0.55, 0.8 at positions 4..7, threshold 0.95: fills in order 5, 7, 4, 6.
    confs = {4: 0.6, 5: 0.9, 6: 0.55, 7: 0.8}
    rule = lambda call, toks: {p: p_logits(10 + p, c) for p, c in confs.items()}  # noqa: E731
    sampler, fake = scripted(rule, threshold=0.95, editing_threshold=None, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[14, 15, 16, 17]]
    assert [c[0, 4:].tolist() for c in fake.calls] == [
        [M, M, M, M],
        [M, 15, M, M],
        [M, 15, M, 17],
        [14, 15, M, 17],
        [14, 15, 16, 17],
    ]
    assert out.stats.forwards_per_row == [5] and out.stats.num_m2t == 4


def test_mask_id_is_never_a_candidate():
    # The mask id has by far the largest logit; token 7 is the only other finite one, so
    # it has conf exactly 1 once the mask is suppressed: all fill at once, then confirm.
    rule = lambda call, toks: {p: {M: 100.0, 7: 0.0} for p in range(len(toks))}  # noqa: E731
    sampler, _ = scripted(rule, threshold=0.7, editing_threshold=0.5, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[7, 7, 7, 7]] and out.stats.forwards_per_row == [2]


def test_block_without_edits_costs_one_confirmation_forward():
    # Target 20 + position with probability 1: each block fills in one forward and stops
    # after exactly one more (no mask, no edit). 2 blocks -> 4 forwards, TPF = 8 / 4 = 2.
    rule = lambda call, toks: {p: {20 + p: 0.0} for p in range(len(toks))}  # noqa: E731
    sampler, _ = scripted(rule, threshold=0.5, editing_threshold=0.0, gen_length=8)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [list(range(24, 32))]
    assert out.stats.forwards_per_row == [4] and out.stats.tpf == 2.0
    assert out.stats.num_m2t == 8 and out.stats.num_t2t == 0
    # max_post_steps = 0: the iteration after the fill breaks before its forward.
    out = sampler.generate([[1, 2, 3, 4]], max_post_steps=0)
    assert out.tokens == [list(range(24, 32))] and out.stats.forwards_per_row == [2]


# ---------------------------------------------------------------------------- T2T
def test_t2t_edits_current_block_only_and_max_post_steps_bounds_it():
    # Call c predicts token 20 + c everywhere with probability 1 (the model never settles).
    # P = 6, bl = 4: block 1 = [p4, p5, g6, g7], block 2 = [g8..g11]; max_post_steps = 2.
    # Block 1: c0 fills g6, g7 = 20; c1 (post 1) edits to 21; c2 (post 2) to 22; post 3 > 2.
    # Block 2: c3 fills 23; c4 -> 24; c5 -> 25. Prompt p4, p5 and block 1 are never touched.
    rule = lambda call, toks: {p: {20 + call: 0.0} for p in range(len(toks))}  # noqa: E731
    sampler, fake = scripted(rule, threshold=0.5, editing_threshold=0.0, max_post_steps=2)
    prompt = [1, 2, 3, 4, 5, 6]
    out = sampler.generate([prompt], gen_length=6)
    assert out.tokens == [[22, 22, 25, 25, 25, 25]]
    assert out.stats.forwards_per_row == [6]
    assert out.stats.num_m2t == 6 and out.stats.num_t2t == 2 + 2 + 4 + 4
    assert fake.calls[3][0].tolist() == prompt + [22, 22, M, M, M, M]
    assert fake.calls[5][0].tolist() == prompt + [22, 22, 24, 24, 24, 24]


def test_t2t_threshold_is_strict():
    # c0 fills 20 (p = 1); later calls: 21 and 22 tie at 0.5. editing_threshold 0.5: no edit,
    # converged after the confirmation. Just below 0.5: edit to 21, then 21 == cand, stop.
    def rule(call, toks):
        if call == 0:
            return {p: {20: 0.0} for p in range(len(toks))}
        return {p: {21: 0.0, 22: 0.0} for p in range(len(toks))}

    sampler, _ = scripted(rule, threshold=0.5, editing_threshold=0.5, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[20] * 4] and out.stats.forwards_per_row == [2]
    sampler, _ = scripted(rule, threshold=0.5, editing_threshold=0.4999, gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[21] * 4] and out.stats.forwards_per_row == [3]
    assert out.stats.num_t2t == 4


def test_wrong_early_token_is_corrected_by_t2t():
    # Quality preset (0.7 / 0.5). c0: position 4 -> 30 at 0.9 (set, wrong); 5..7 at 0.6 (not).
    # c1: 5..7 at 0.9 are set; position 4 (visible since c0) now says 40 at 0.8 > 0.5: edited.
    # c2: no mask, nothing to edit: converged. 3 forwards, 4 M2T, 1 T2T.
    def rule(call, toks):
        if call == 0:
            return {4: p_logits(30, 0.9), **{p: p_logits(40 + p - 4, 0.6) for p in (5, 6, 7)}}
        return {4: p_logits(40, 0.8), **{p: p_logits(40 + p - 4, 0.9) for p in (5, 6, 7)}}

    sampler, _ = scripted(rule, **_preset("quality"), gen_length=4)
    out = sampler.generate([[1, 2, 3, 4]])
    assert out.tokens == [[40, 41, 42, 43]]
    assert out.stats.forwards_per_row == [3]
    assert (out.stats.num_m2t, out.stats.num_t2t) == (4, 1)


def test_repetition_penalty():
    # Logits 10: 1.0, 11: 0.5 everywhere; lambda = 1; threshold 0 (every mask is set), edit 0.
    # c0: pos 4 follows the prompt's 10 -> 11; 5..7 follow masks -> 10: [11, 10, 10, 10].
    # c1: 6, 7 follow 10 -> 11: [11, 10, 11, 11]. c2: 7 follows 11 -> 10: [11, 10, 11, 10].
    # c3: all agree: converged. Without the penalty: [10] * 4 in 2 forwards.
    rule = lambda call, toks: {p: {10: 1.0, 11: 0.5} for p in range(len(toks))}  # noqa: E731
    sampler, _ = scripted(rule, threshold=0.0, editing_threshold=0.0, gen_length=4)
    out = sampler.generate([[1, 2, 3, 10]], repetition_penalty=1.0)
    assert out.tokens == [[11, 10, 11, 10]]
    assert out.stats.forwards_per_row == [4] and out.stats.num_t2t == 3
    out = sampler.generate([[1, 2, 3, 10]])
    assert out.tokens == [[10] * 4] and out.stats.forwards_per_row == [2]


# ---------------------------------------------------------------------------- EOS
def _eos_rule(call, toks):
    targets = [5, E, 7, 8, 9, 10, 11, 12]  # positions 4..11
    return {4 + i: {t: 0.0} for i, t in enumerate(targets) if 4 + i < len(toks)}


def test_eos_early_stop_and_cut():
    sampler, _ = scripted(_eos_rule, gen_length=8)
    out = sampler.generate([[1, 2, 3, 4]])  # EOS in block 1: stop after it
    assert out.tokens == [[5, E]] and out.stats.forwards_per_row == [2]
    out = sampler.generate([[1, 2, 3, 4]], eos_early_stop=False)  # decodes block 2, then cuts
    assert out.tokens == [[5, E]] and out.stats.forwards_per_row == [4]
    # An EOS in the prompt does not stop anything.
    rule = lambda call, toks: {p: {20 + p: 0.0} for p in range(len(toks))}  # noqa: E731
    sampler, _ = scripted(rule, gen_length=8)
    out = sampler.generate([[1, 2, E, 4]])
    assert out.tokens == [list(range(24, 32))] and out.stats.forwards_per_row == [4]


def test_batch_rows_wait_and_finished_rows_leave():
    # Row 0 says EOS early and is sure (2 forwards for block 1, then stops); row 1 needs the
    # fallback 4 times (+1 confirmation) in block 1 and 2 forwards in block 2.
    def rule(call, toks):
        if toks[0] == 1:
            return _eos_rule(call, toks)
        return {p: p_logits(30 + p, 0.6 if p < 8 else 1.0) for p in range(4, len(toks))}

    sampler, fake = scripted(rule, gen_length=8, threshold=0.7, editing_threshold=None)
    out = sampler.generate([[1, 2, 3, 4], [2, 2, 3, 4]])
    assert out.tokens == [[5, E], list(range(34, 42))]
    assert out.stats.forwards_per_row == [2, 7]
    assert [c.shape[0] for c in fake.calls] == [2, 2, 1, 1, 1, 1, 1]
    assert out.stats.num_model_calls == 7


# ---------------------------------------------------------------------------- sampling
def test_sample_candidates_filters():
    logits = torch.full((1, 2000, V), NEG)
    logits[..., 10], logits[..., 11], logits[..., 12] = math.log(0.5), math.log(0.3), math.log(0.2)
    cand, conf = sample_candidates(logits, 0.0, None, None, None)
    assert (cand == 10).all() and torch.allclose(conf, torch.tensor(0.5))
    # top_p 0.6 keeps {10, 11} (0.5 < 0.6, then 0.8 crosses): renormalised 0.625 / 0.375.
    gen = torch.Generator().manual_seed(0)
    cand, conf = sample_candidates(logits, 1.0, None, 0.6, gen)
    assert set(cand.unique().tolist()) == {10, 11}
    assert torch.allclose(conf[cand == 10], torch.tensor(0.625))
    assert torch.allclose(conf[cand == 11], torch.tensor(0.375))
    cand, conf = sample_candidates(logits, 1.0, 1, None, gen)  # top-k 1: argmax, conf 1
    assert (cand == 10).all() and (conf == 1.0).all()


# ---------------------------------------------------------------------------- MBE
def _mbe_rule(call, toks):
    # Position 4 reads 30 until block 2 (positions 8..11) is complete, then 24 (p = 1).
    block2_done = len(toks) >= 12 and M not in toks[8:12]
    return {4: {24 if block2_done else 30: 0.0}, **{p: {20 + p: 0.0} for p in range(5, len(toks))}}


def test_multi_block_editing_fixes_an_earlier_block():
    sampler, _ = scripted(_mbe_rule, **_preset("quality"), gen_length=8)
    out = sampler.generate([[1, 2, 3, 4]])  # off: block 1 is frozen with the wrong 30
    assert out.tokens == [[30, *range(25, 32)]] and out.stats.forwards_per_row == [4]
    streamed = []
    out = sampler.generate(
        [[1, 2, 3, 4]],
        multi_block_editing=True,
        on_block=lambda r, j, toks: streamed.append((r, j, toks)),
    )
    assert out.tokens == [list(range(24, 32))]
    assert out.stats.forwards_per_row == [5] and out.stats.num_mbe_edits == 1
    assert streamed == [(0, 0, [24, 25, 26, 27]), (0, 1, [28, 29, 30, 31])]  # final blocks


# ---------------------------------------------------------------------------- config
def _preset(name: str) -> dict:
    threshold, editing_threshold, max_post_steps = PRESETS[name]
    return dict(
        threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hydra_presets_match(name):
    with open(os.path.join(CONF_DIR, "sampler", f"{name}.yaml")) as f:
        values = yaml.safe_load(f)
    assert values.pop("block_length") is None  # null: the model's trained block length
    cfg = SamplerConfig(**values)  # every key is a field
    assert set(values) | {"block_length"} == {f for f in SamplerConfig.__dataclass_fields__}
    assert (cfg.threshold, cfg.editing_threshold, cfg.max_post_steps) == PRESETS[name]
    assert cfg == SamplerConfig.from_preset(name, **values)
    assert (cfg.block_length, cfg.temperature) == (32, 0.0)
    assert sampler_config({**values, "block_length": None}) == cfg  # no model dir: 32
    # As a Hydra structured config: the YAML merges onto the schema, overrides work, typos fail.
    schema = OmegaConf.structured(SamplerConfig)
    merged = OmegaConf.merge(schema, values, OmegaConf.from_dotlist(["gen_length=64"]))
    assert OmegaConf.to_object(merged) == SamplerConfig.from_preset(name, gen_length=64)
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["treshold=0.3"]))


def test_bad_input_is_rejected():
    sampler, _ = scripted(lambda call, toks: {})
    with pytest.raises(ValueError, match="mask id"):
        sampler.generate([[1, M, 3]])
    with pytest.raises(ValueError, match="unknown sampler option"):
        sampler.generate([[1, 2]], treshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        SamplerConfig(threshold=1.5)


# ---------------------------------------------------------------------------- tiny model
PROMPT_LENGTHS = (0, 3, 8, 13, 21)  # an empty prompt too


@pytest.fixture(scope="module")
def tiny_model() -> LLaDA2MoeModelLM:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=V, num_hidden_layers=2)
    model = LLaDA2MoeModelLM(config).eval()
    with torch.no_grad():  # sharper predictions: several tokens per forward, real T2T traffic
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 60, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("mbe", [False, True])
def test_cached_equals_uncached(tiny_model, prompts, preset, mbe):
    config = SamplerConfig.from_preset(
        preset, block_length=8, gen_length=24, multi_block_editing=mbe, mbe_window=3
    )
    sampler = Sampler(tiny_model, M, E, config)
    cached = sampler.generate(prompts, use_cache=True)
    uncached = sampler.generate(prompts, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.stats.forwards_per_row == uncached.stats.forwards_per_row
    assert cached.stats.num_model_calls == uncached.stats.num_model_calls
    assert cached.stats.num_t2t == uncached.stats.num_t2t
    assert cached.stats.num_forward_tokens < uncached.stats.num_forward_tokens
    assert all(M not in t for t in cached.tokens)
    if mbe and preset == "speed":  # the cache rewind after an MBE edit is exercised
        assert cached.stats.num_mbe_edits > 0


def test_multi_block_editing_off_changes_nothing(tiny_model, prompts):
    base = Sampler(tiny_model, M, E, SamplerConfig(block_length=8, gen_length=24))
    off = base.generate(prompts, multi_block_editing=False, mbe_window=4)
    ref = base.generate(prompts)
    assert off.tokens == ref.tokens and off.stats.forwards_per_row == ref.stats.forwards_per_row


@pytest.mark.parametrize("block_length", [8, 32])
def test_batch_equals_single_calls(tiny_model, prompts, block_length):
    sampler = Sampler(tiny_model, M, E, SamplerConfig(block_length=block_length, gen_length=40))
    batched = sampler.generate(prompts)
    singles = [sampler.generate([p]) for p in prompts]
    assert batched.tokens == [s.tokens[0] for s in singles]
    assert batched.stats.forwards_per_row == [s.stats.forwards_per_row[0] for s in singles]
    assert batched.stats.num_model_calls == max(batched.stats.forwards_per_row)


def test_streaming_reassembles_the_output(tiny_model, prompts):
    sampler = Sampler(tiny_model, M, E, SamplerConfig(block_length=8, gen_length=24))
    streamed: dict[int, list[tuple[int, list[int]]]] = {}
    as_tensors = [torch.tensor(p, dtype=torch.long) for p in prompts]
    out = sampler.generate(
        as_tensors, on_block=lambda r, j, t: streamed.setdefault(r, []).append((j, t))
    )
    assert out.tokens == sampler.generate(prompts).tokens
    for r, tokens in enumerate(out.tokens):
        assert [j for j, _ in streamed[r]] == list(range(len(streamed[r])))
        assert sum((t for _, t in streamed[r]), []) == tokens


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(tiny_model, prompts):
    sampler = Sampler(tiny_model, M, E, SamplerConfig(block_length=8, gen_length=16))
    assert sampler.generate(prompts).tokens == sampler.generate(prompts).tokens
    a = sampler.generate(prompts, temperature=1.0, top_p=0.95, seed=123)
    b = sampler.generate(prompts, temperature=1.0, top_p=0.95, seed=123)
    c = sampler.generate(prompts, temperature=1.0, top_p=0.95, seed=123, use_cache=False)
    d = sampler.generate(prompts, temperature=1.0, top_p=0.95, seed=7)
    assert a.tokens == b.tokens == c.tokens
    assert a.stats.forwards_per_row == c.stats.forwards_per_row
    assert a.tokens != d.tokens


def test_eos_rows_leave_the_cached_batch(tiny_model, prompts):
    # Take as EOS a token the model actually writes, so rows stop at different blocks and
    # leave the batch (and the cache) while the others go on; all paths must still agree.
    config = SamplerConfig(block_length=8, gen_length=32)
    draft = Sampler(tiny_model, M, E, config).generate(prompts)
    counts = torch.bincount(torch.tensor(sum(draft.tokens, [])), minlength=V)
    eos = int(counts.argmax())
    sampler = Sampler(tiny_model, M, eos, config)
    cached = sampler.generate(prompts)
    uncached = sampler.generate(prompts, use_cache=False)
    singles = [sampler.generate([p]) for p in prompts]
    assert cached.tokens == uncached.tokens == [s.tokens[0] for s in singles]
    assert cached.stats.forwards_per_row == [s.stats.forwards_per_row[0] for s in singles]
    lengths = cached.stats.tokens_per_row
    assert min(lengths) < 32 and all(t[-1] == eos for t in cached.tokens if len(t) < 32)
    assert len(set(cached.stats.forwards_per_row)) > 1  # rows really stopped at different times


def test_no_mask_above_threshold_picks_what_topk_picks_on_a_tied_row():
    """The official decoding sets `topk(k=1)` of the masked confidences when none clears the
    threshold; on an exact tie torch.topk and argmax can disagree, and ours must follow topk."""
    block = torch.full((2, 8), M)  # (N, bl) all masked
    block[1, 5] = 7  # row 1: position 5 visible (never a fill, even with the top confidence)
    conf = torch.tensor([[0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                         [0.1, 0.1, 0.1, 0.1, 0.2, 0.9, 0.1, 0.2]])  # fmt: skip
    cand = torch.arange(16).view(2, 8) + 10
    new, fill, edit = joint_threshold_step(
        block, cand, conf, torch.ones_like(block, dtype=torch.bool), M, 0.5, None
    )
    masked_conf = conf.masked_fill(block != M, float("-inf"))
    official = masked_conf.topk(1, dim=1).indices[:, 0]
    assert official[0] != masked_conf[0].argmax(), "row 0 no longer tells topk from argmax"
    for row in range(2):
        assert fill[row].nonzero().flatten().tolist() == [int(official[row])]
        assert new[row, official[row]] == cand[row, official[row]]
    assert not edit.any()
