"""Block-sparse FlexAttention vs dense-mask SDPA, and bf16 numerics, on CPU.

- Every mask kind (training block diffusion with and without documents, the document mask of
  one-block training, the sampler's block-causal mask with cached prefix, left padding and the
  MBE window): the mask_mod equals the dense reference element by element, and the BlockMask's
  block tables (which the fused GPU kernels read instead of the mask: partial blocks apply the
  mask_mod, full blocks skip it, absent blocks are never computed) cover exactly the allowed
  pairs, in the forward (kv) and backward (q) direction.
- The tiny model run with `attention_backend='flex'` and 'sdpa': logits and every parameter
  gradient agree within fp32 rounding (tolerances: logits max |diff| 1e-5, observed 1.2e-7;
  each gradient tensor max |diff| 1e-5 x its largest |entry|, observed 1.4e-6 x). On CPU
  FlexAttention runs its eager math implementation (the fused kernel: tests/test_gpu.py).
- The sampler decodes the same tokens with both backends (cached, batch with left padding).
- bf16: router scores, combine weights, the expert weighted sum and logits stay fp32; the tiny
  model's bf16 logits and loss agree with fp32 within stated tolerances.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from llada_train.corruption import Corruption
from llada_train.losses import diffusion_loss
from llada_train.masks import (
    AttentionMask,
    block_diffusion_mask,
    decode_mask,
    document_mask,
    training_inputs,
)
from llada_train.model.attention import resolve_backend
from llada_train.model.modeling import LLaDA2MoeModelLM, SparseMoE
from llada_train.sampler import Sampler, SamplerConfig
from tests.conftest import tiny_config


def _doc_ids(batch: int, seq_len: int, cuts: list[list[int]]) -> torch.Tensor:
    doc = torch.zeros(batch, seq_len, dtype=torch.long)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            doc[row, c:] += 1
    return doc


def _decode_masks() -> dict[str, AttentionMask]:
    bl = 4
    return {
        "prompt, no padding": decode_mask(torch.arange(12), torch.arange(12), 12, bl, [0]),
        "cached block, padding": decode_mask(
            torch.arange(8, 12), torch.arange(8, 12), 12, bl, [0, 4, 8]
        ),
        "first forward over padding": decode_mask(
            torch.arange(16), torch.arange(16), 16, bl, [0, 8]
        ),
        "chunk after cache": decode_mask(torch.arange(4, 16), torch.arange(4, 16), 16, bl, [4, 0]),
        "MBE window": decode_mask(
            torch.tensor([15] * 8), torch.arange(8, 16), 16, bl, [0, 4]
        ),  # window queries see every key up to the end
    }


def _training_masks() -> dict[str, AttentionMask]:
    seq_len, bl = 24, 4
    xt = torch.zeros(2, seq_len, dtype=torch.long)
    doc = _doc_ids(2, seq_len, [[5, 13], [9]])
    return {
        "block diffusion": training_inputs(xt, xt, bl)[1],
        "block diffusion, documents": training_inputs(xt, xt, bl, doc)[1],
        "documents, one block": training_inputs(xt, xt, seq_len, doc)[1],
    }


ALL_MASKS = {**_training_masks(), **_decode_masks()}


def test_training_masks_are_the_reference_tensors():
    xt = torch.zeros(2, 24, dtype=torch.long)
    doc = _doc_ids(2, 24, [[5, 13], [9]])
    assert torch.equal(training_inputs(xt, xt, 4)[1].dense(), block_diffusion_mask(24, 4))
    assert torch.equal(
        training_inputs(xt, xt, 4, doc)[1].dense(), block_diffusion_mask(24, 4, doc_ids=doc)
    )
    assert torch.equal(training_inputs(xt, xt, 24, doc)[1].dense(), document_mask(doc))
    assert training_inputs(xt, xt, 24)[1] is None  # one block, one document: full attention


def test_decode_mask_hand_case():
    # 2 rows, block 2, keys 0..5, queries = block 2 (columns 4, 5); row 1 has 2 padding columns
    mask = decode_mask(torch.arange(4, 6), torch.arange(4, 6), 6, 2, [0, 2]).dense()
    assert mask.shape == (2, 1, 2, 6)
    assert mask[0, 0].all()  # no padding: every key of blocks <= 2
    assert mask[1, 0].tolist() == [[False, False, True, True, True, True]] * 2
    # padding queries (row 1, columns 0-1) see only themselves
    pad_q = decode_mask(torch.arange(4), torch.arange(4), 4, 2, [0, 2]).dense()[1, 0]
    assert pad_q.tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]


@pytest.mark.parametrize("name", sorted(ALL_MASKS))
def test_mask_mod_equals_dense_reference(name):
    spec = ALL_MASKS[name]
    dense = spec.dense()  # (B|1, 1, Lq, Lk)
    batch = spec.batch_size or 1
    grid = create_mask(spec.mask_mod, spec.batch_size, None, spec.q_len, spec.kv_len, "cpu")
    assert torch.equal(grid, dense.expand(batch, -1, -1, -1)), name


def _dense_from_tables(num_blocks, indices, n_rows, n_cols) -> torch.Tensor:
    """(B, nRowBlocks, nColBlocks) bool from BlockMask tables (num (B,H,R), indices (B,H,R,C))."""
    b, _, r = num_blocks.shape
    out = torch.zeros(b, n_rows, n_cols, dtype=torch.bool)
    for i in range(b):
        for row in range(r):
            for j in indices[i, 0, row, : num_blocks[i, 0, row]].tolist():
                out[i, row, j] = True
    return out


@pytest.mark.parametrize("name", sorted(ALL_MASKS))
def test_block_tables_cover_the_mask_exactly(name):
    """Small BLOCK_SIZE (4) so that every mask has partial, full and empty blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    spec = ALL_MASKS[name]
    size = 4
    bm = create_block_mask(
        spec.mask_mod, spec.batch_size, None, spec.q_len, spec.kv_len, "cpu", BLOCK_SIZE=size
    )
    dense = spec.dense().expand(spec.batch_size or 1, -1, -1, -1)[:, 0]  # (B, Lq, Lk)
    nq, nk = -(-spec.q_len // size), -(-spec.kv_len // size)
    padded = torch.zeros(dense.shape[0], nq * size, nk * size, dtype=torch.bool)
    padded[:, : spec.q_len, : spec.kv_len] = dense
    tiles = padded.view(-1, nq, size, nk, size).transpose(2, 3)  # (B, nq, nk, size, size)
    any_allowed = tiles.any((-1, -2))
    # only real (unpadded) positions count for "full"
    valid = torch.zeros_like(padded)
    valid[:, : spec.q_len, : spec.kv_len] = True
    valid_tiles = valid.view(-1, nq, size, nk, size).transpose(2, 3)
    all_allowed = (tiles | ~valid_tiles).all((-1, -2))
    partial = _dense_from_tables(bm.kv_num_blocks, bm.kv_indices, nq, nk)
    full = _dense_from_tables(bm.full_kv_num_blocks, bm.full_kv_indices, nq, nk)
    assert not (partial & full).any()
    assert torch.equal(partial | full, any_allowed), "a computed block set differs from the mask"
    assert torch.equal(full, all_allowed & any_allowed), "full blocks must be entirely allowed"
    # backward tables (per kv block, the q blocks) are the transposes
    q_partial = _dense_from_tables(bm.q_num_blocks, bm.q_indices, nk, nq)
    q_full = _dense_from_tables(bm.full_q_num_blocks, bm.full_q_indices, nk, nq)
    assert torch.equal(q_partial, partial.transpose(1, 2))
    assert torch.equal(q_full, full.transpose(1, 2))


def test_block_mask_built_once_per_shape():
    xt = torch.zeros(2, 24, dtype=torch.long)
    first = training_inputs(xt, xt, 4)[1].block_mask()
    assert training_inputs(xt, xt, 4)[1].block_mask() is first  # cached by (L, block_length)
    assert training_inputs(xt, xt, 8)[1].block_mask() is not first
    a = decode_mask(torch.arange(8, 12), torch.arange(8, 12), 12, 4, [0, 4])
    b = decode_mask(torch.arange(8, 12), torch.arange(8, 12), 12, 4, [0, 4])
    assert a.block_mask() is b.block_mask()
    c = decode_mask(torch.arange(8, 12), torch.arange(8, 12), 12, 4, [4, 0])
    assert c.block_mask() is not a.block_mask()


def test_backend_names():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        resolve_backend("flash", torch.device("cpu"))


def _logits_and_grads(model: LLaDA2MoeModelLM, backend: str, input_ids, mask, positions, sl):
    model.attention_backend = backend
    model.zero_grad(set_to_none=True)
    logits = model(input_ids, attention_mask=mask, position_ids=positions, logits_slice=sl)
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits * weights).sum().backward()  # a loss that touches every logit differently
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(
    "case", ["block diffusion", "block diffusion, documents", "documents, one block"]
)
def test_flex_and_sdpa_agree_in_training(case):
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config(vocab_size=64)).train()
    seq_len, bl = 24, 4
    x0 = torch.randint(0, 63, (2, seq_len))
    xt = x0.masked_fill(torch.rand(2, seq_len) < 0.5, 63)
    doc = None if case == "block diffusion" else _doc_ids(2, seq_len, [[5, 13], [9]])
    block = seq_len if case == "documents, one block" else bl
    ids, mask, pos, sl = training_inputs(xt, x0, block, doc)
    ref_logits, ref_grads = _logits_and_grads(model, "sdpa", ids, mask, pos, sl)
    logits, grads = _logits_and_grads(model, "flex", ids, mask, pos, sl)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():  # relative to the tensor's largest entry (grads up to ~80)
        err = float((g - ref_grads[name]).abs().max())
        assert err <= 1e-5 * float(ref_grads[name].abs().max()) + 1e-8, (name, err)


@pytest.mark.parametrize("name", sorted(_decode_masks()))
def test_flex_and_sdpa_agree_on_decode_masks(name):
    """One decoder call per mask: queries = the mask's query columns over a prefix cache."""
    from llada_train.model.modeling import PrefixKVCache

    spec = _decode_masks()[name]
    torch.manual_seed(1)
    model = LLaDA2MoeModelLM(tiny_config(vocab_size=64)).eval()
    batch = spec.batch_size
    ids = torch.randint(0, 64, (batch, spec.kv_len))
    q_lo = spec.kv_len - spec.q_len
    out = {}
    for backend in ("sdpa", "flex"):
        model.attention_backend = backend
        with torch.no_grad():
            cache = PrefixKVCache.empty(model.config.num_hidden_layers)
            if q_lo:  # fill the cache with the prefix (full attention: not under test here)
                model(ids[:, :q_lo], kv_cache=cache, commit_len=q_lo)
            out[backend] = model(ids[:, q_lo:], attention_mask=spec, kv_cache=cache)
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=1e-5, rtol=0)


def test_sampler_decodes_the_same_with_both_backends():
    torch.manual_seed(2)
    model = LLaDA2MoeModelLM(tiny_config(vocab_size=64)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident: several tokens per forward, edits happen
    prompts = [[5, 6, 7], list(range(10, 21)), [3]]  # different lengths: left padding
    for mbe in (False, True):  # MBE: the bidirectional window mask over a cache view
        config = SamplerConfig.from_preset(
            "quality", block_length=4, gen_length=12, multi_block_editing=mbe, mbe_window=2
        )
        outputs = {}
        for backend in ("sdpa", "flex"):
            model.attention_backend = backend
            sampler = Sampler(model, mask_id=63, eos_id=62, config=config)
            outputs[backend] = sampler.generate(prompts, use_cache=True)
        assert outputs["flex"].tokens == outputs["sdpa"].tokens
        assert outputs["flex"].stats.forwards_per_row == outputs["sdpa"].stats.forwards_per_row
        assert outputs["sdpa"].stats.num_m2t > 0 and len(set(map(len, prompts))) == 3


# ---------------------------------------------------------------------------- bf16 numerics
def test_bf16_keeps_router_combine_and_logits_in_fp32():
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config()).to(torch.bfloat16).train()
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    x = torch.randn(10, model.config.hidden_size, dtype=torch.bfloat16)
    topk_idx, weights, scores = moe.gate(x)
    assert weights.dtype == scores.dtype == torch.float32
    y = moe(x)
    assert y.dtype == torch.bfloat16
    # the weighted sum is fp32 then rounded once: equal to the fp32 sum of the same bf16 expert
    # outputs rounded to bf16 (an all-bf16 sum would round after every product and addition)
    flat_order = torch.argsort(topk_idx.reshape(-1), stable=True)
    load = torch.bincount(topk_idx.reshape(-1), minlength=moe.num_experts)
    token_of = flat_order // moe.top_k
    y_sorted = moe.experts(x.index_select(0, token_of), torch.cumsum(load, 0))
    w_sorted = weights.reshape(-1)[flat_order]
    routed = torch.zeros(10, x.shape[1]).index_add_(
        0, token_of, y_sorted.float() * w_sorted[:, None]
    )
    expected = routed.to(torch.bfloat16) + moe.shared_experts(x)
    assert torch.equal(y, expected)
    ids = torch.randint(0, 96, (2, 16))
    logits = model(ids)
    assert logits.dtype == torch.float32


def test_bf16_model_matches_fp32_within_tolerance():
    """Same weights (rounded to bf16 once), same batch: bf16 vs fp32 compute.

    Tolerances (tiny model, logits of scale ~0.1): logits max |diff| < 0.05 and mean < 0.005;
    the loss within 1% relative. An all-bf16 router or combine sum would still pass these at
    this size, so the fp32 parts are checked exactly by the test above.
    """
    torch.manual_seed(0)
    model32 = LLaDA2MoeModelLM(tiny_config(vocab_size=64)).train()
    with torch.no_grad():  # start both from bf16-representable weights
        for p in model32.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model16 = LLaDA2MoeModelLM(tiny_config(vocab_size=64)).train()
    model16.load_state_dict(model32.state_dict())
    model16.to(torch.bfloat16)
    seq_len = 32
    x0 = torch.randint(0, 63, (4, seq_len))
    masked = torch.rand(4, seq_len) < 0.5
    xt = x0.masked_fill(masked, 63)
    t = masked.float().mean(1)
    ids, mask, pos, sl = training_inputs(xt, x0, 8)
    out = {}
    for name, model in (("fp32", model32), ("bf16", model16)):
        logits = model(ids, attention_mask=mask, position_ids=pos, logits_slice=sl)
        assert logits.dtype == torch.float32
        c = Corruption(xt, masked, torch.zeros_like(masked), torch.zeros_like(masked), t)
        terms = diffusion_loss(logits.to(model.lm_head.weight.dtype), x0, c)  # bf16 logits in
        assert terms.total_sum.dtype == torch.float32  # cast after the gather, CE in fp32
        out[name] = (logits.detach(), float(terms.total_sum.detach() / terms.total_count))
    diff = (out["bf16"][0] - out["fp32"][0]).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max(), diff.mean())
    assert abs(out["bf16"][1] - out["fp32"][1]) / out["fp32"][1] < 0.01, out


def test_training_config_rejects_an_unknown_backend():
    from omegaconf import OmegaConf

    from llada_train.config import TrainConfig
    from llada_train.train import check_config

    cfg = OmegaConf.structured(TrainConfig(model={}))
    cfg.data.kind = "sft"
    check_config(cfg, "sft")  # the default passes
    cfg.attention_backend = "flash"
    with pytest.raises(ValueError, match="attention_backend='flash'.*auto"):
        check_config(cfg, "sft")
