"""Packed SFT: chats share a sequence with the document mask and keep their unpacked loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_config

from llada_train.corruption import Corruption, corrupt
from llada_train.data.pipeline import Example, choose_packing, collate, pack_examples
from llada_train.masks import block_diffusion_mask
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.train import model_forward

BLOCK = 8
MASK_ID = 1


def chat(length: int, prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(5, 96, (1, length), generator=g)  # (1, L)
    maskable = torch.arange(length)[None] >= prompt  # (1, L)
    return x0, maskable


def corrupted(x0, maskable, seed) -> Corruption:
    return corrupt(
        x0, maskable, [seed], mask_id=MASK_ID, t_min=0.3, t_max=0.8, noise_max=0.2,
        keep_share=0.3, vocab_size=96, special_ids=[0, 1, 2, 3, 4],
    )  # fmt: skip


def test_packed_logits_and_losses_equal_unpacked():
    """Chats of 1, 3 and 2 blocks, corrupted alone, then laid side by side in one row with doc
    ids: every logit of every chat agrees with its unpacked forward (fp32, atol 2e-5; the only
    difference is the absolute RoPE angle), so per-chat cross-entropies agree too."""
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config()).eval()
    chats = [chat(BLOCK, 3, 0), chat(3 * BLOCK, 10, 1), chat(2 * BLOCK, 5, 2)]
    cs = [corrupted(x0, m, 10 + i) for i, (x0, m) in enumerate(chats)]
    with torch.no_grad():
        alone = [
            model_forward(model, c.xt, x0, None, BLOCK)
            for (x0, _), c in zip(chats, cs, strict=True)
        ]
        x0 = torch.cat([x for x, _ in chats], dim=1)  # (1, 6 blocks)
        xt = torch.cat([c.xt for c in cs], dim=1)
        docs = torch.cat([torch.full_like(x, i) for i, (x, _) in enumerate(chats)], dim=1)
        packed = model_forward(model, xt, x0, docs, BLOCK)
    start = 0
    for (x, _), c, logits in zip(chats, cs, alone, strict=True):
        n = x.shape[1]
        torch.testing.assert_close(packed[:, start : start + n], logits, atol=2e-5, rtol=1e-5)
        sup = c.supervised[0]
        ce_alone = F.cross_entropy(logits[0, sup], x[0, sup])
        ce_packed = F.cross_entropy(packed[0, start : start + n][sup], x[0, sup])
        torch.testing.assert_close(ce_packed, ce_alone, atol=1e-5, rtol=1e-5)
        start += n


def test_no_attention_across_documents():
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(tiny_config()).eval()
    (a, _), (b, _) = chat(2 * BLOCK, 0, 0), chat(2 * BLOCK, 0, 1)
    docs = torch.tensor([[0] * 2 * BLOCK + [1] * 2 * BLOCK])
    x0 = torch.cat((a, b), dim=1)
    other = torch.cat((a, torch.roll(b, 3, dims=1)), dim=1)  # only document 1 changes
    with torch.no_grad():
        first = model_forward(model, x0, x0, docs, BLOCK)
        second = model_forward(model, other, other, docs, BLOCK)
    assert torch.equal(first[:, : 2 * BLOCK], second[:, : 2 * BLOCK])
    assert not torch.equal(first[:, 2 * BLOCK :], second[:, 2 * BLOCK :])
    mask = block_diffusion_mask(4 * BLOCK, BLOCK, doc_ids=docs)[0, 0]  # (2L, 2L)
    d = torch.cat((docs[0], docs[0]))
    assert not (mask & (d[:, None] != d[None, :])).any()


def test_pack_examples_keeps_chats_whole_and_aligned():
    lengths = [32, 64, 32, 96, 32, 128, 32]
    examples = [Example(list(range(n)), [True] * n) for n in lengths]
    packed = pack_examples(examples, max_length=128, seed=0)
    assert sorted(len(e.input_ids) for e in packed)[-1] <= 128
    assert sum(len(e.input_ids) for e in packed) == sum(lengths)
    for e in packed:
        bounds = [i for i in range(1, len(e.doc_ids)) if e.doc_ids[i] != e.doc_ids[i - 1]]
        assert all(i % 32 == 0 for i in bounds)  # every chat starts on a block boundary
        assert e.doc_ids[0] == 0 and e.doc_ids[-1] == len(bounds)
    batch = collate(packed[:2], eos_id=0, pad_maskable=False, example_index=[0, 1])
    assert batch.doc_ids is not None and batch.x0.shape[1] == max(
        len(e.input_ids) for e in packed[:2]
    )


def test_auto_packs_long_tails_not_single_blocks():
    one_block = [Example([5] * 32, [True] * 32) for _ in range(256)]
    got, figures = choose_packing(one_block, "auto", 128, 32, 16, 8, 0)
    assert got is one_block and figures["packed"] == 0.0  # 1 block needs no clean copy
    g = torch.Generator().manual_seed(0)
    blocks = (torch.rand(256, generator=g) ** 4 * 8).long() + 1  # mostly 1-2 blocks, up to 8
    tail = [Example([5] * (32 * int(k)), [True] * (32 * int(k))) for k in blocks]
    got, figures = choose_packing(tail, "auto", 256, 32, 16, 8, 0)
    assert figures["packed"] == 1.0 and len(got) < len(tail)
    assert figures["forward_tokens_per_chat_packed"] < figures["forward_tokens_per_chat_plain"]
    assert choose_packing(tail, "never", 256, 32, 16, 8, 0)[0] is tail
    # dense SDPA attention (the CPU default): auto does not pack, "always" still does
    assert choose_packing(tail, "auto", 256, 32, 16, 8, 0, block_sparse=False)[0] is tail
    assert len(choose_packing(tail, "always", 256, 32, 16, 8, 0, block_sparse=False)[0]) < 256
