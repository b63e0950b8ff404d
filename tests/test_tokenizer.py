"""The shipped tokenizer: HF loading, fixed special ids, byte-level round trip, the LLaDA2 chat
template, deterministic rebuilds, and `special_ids` on ours and on an official-style tokenizer."""

from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import llada_train
from llada_train.tokenizer import (
    SHIPPED_CORPUS,
    SPECIAL_TOKENS,
    SpecialIds,
    build_tokenizer,
    load_tokenizer,
    special_ids,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(llada_train.DEFAULT_TOKENIZER_DIR)


def test_shipped_tokenizer_loads_as_fast_hf_tokenizer(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 1024
    assert isinstance(load_tokenizer(), PreTrainedTokenizerFast)  # the default path


def test_special_tokens_have_fixed_single_ids(tok):
    expected = {
        "<|endoftext|>": 0,
        "<|mask|>": 1,
        "<role>": 2,
        "</role>": 3,
        "<|role_end|>": 4,
    }
    assert dict(zip(SPECIAL_TOKENS, range(5), strict=True)) == expected
    for token, token_id in expected.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.encode(token) == [token_id]
        # Never split, whatever surrounds it (no space, digits, another special).
        for text in (f"ab{token}cd", f"1{token}2", f" {token} ", f"{token}{token}<|mask|>"):
            ids = tok.encode(text)
            assert ids.count(token_id) == text.count(token), (text, ids)
            assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.mask_token == "<|mask|>"
    assert special_ids(tok) == SpecialIds(
        mask_id=1, eos_id=0, pad_id=0, all_special=tuple(sorted(tok.all_special_ids))
    )
    assert {0, 1, 2, 3, 4} <= set(special_ids(tok).all_special)


def test_partial_markers_are_plain_text(tok):
    for text in ("<role", "role>", "<|mask", "mask|>", "</ role>", "<|endoftext"):
        ids = tok.encode(text)
        assert not set(ids) & set(tok.all_special_ids), (text, ids)
        assert tok.decode(ids) == text


def test_no_bos_or_eos_added(tok):
    assert tok.encode("123 + 456 = 579.") == tok("123 + 456 = 579.")["input_ids"]
    assert 0 not in tok.encode("hello")


@pytest.mark.parametrize(
    "text",
    [
        "123 + 456 = 579.",
        "def add_7(x):\n    return x + 7\n",
        "  leading and trailing spaces  \t\ttabs\n\n\nnewlines ",
        "Grüße, café, naïve — “quotes” ¿qué? 日本語のテキスト 🙂👍🏽 \u200b zero-width",
        "\x00\x01 control bytes \x7f and a lone accent e\u0301",
        "",
        "x<|mask|><|mask|>y <role>HUMAN</role>hi<|role_end|>",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    # 3-digit arithmetic is learned digit by digit: a number is never one opaque token.
    pieces = tok.convert_ids_to_tokens(tok.encode("579 1000"))
    assert pieces == ["5", "7", "9", "Ġ", "1", "0", "0", "0"]


def test_chat_template_two_turns(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 123 + 456?"},
        {"role": "assistant", "content": "579"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]
    expected = (
        "<role>SYSTEM</role>You are a helpful assistant.<|role_end|>"
        "<role>HUMAN</role>What is 123 + 456?<|role_end|>"
        "<role>ASSISTANT</role>579<|role_end|>"
        "<role>HUMAN</role>And 1 + 1?<|role_end|>"
        "<role>ASSISTANT</role>2<|role_end|>"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected


def test_chat_template_generation_prompt_and_no_default_system(tok):
    messages = [{"role": "user", "content": "What is 123 + 456?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<role>HUMAN</role>What is 123 + 456?<|role_end|><role>ASSISTANT</role>"
    assert prompt.endswith("<role>ASSISTANT</role>")
    ids = tok.encode(prompt)
    assert ids[:3] == [2, tok.convert_tokens_to_ids("HUMAN"), 3]  # role names are one token
    assert ids[-3:] == [2, tok.convert_tokens_to_ids("ASSISTANT"), 3]
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert no_prompt == "<role>HUMAN</role>What is 123 + 456?<|role_end|>"


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_build_is_deterministic_and_reproduces_shipped(tmp_path):
    corpus = [os.path.join(llada_train.DATA_DIR, p) for p in SHIPPED_CORPUS]
    for name in ("a", "b"):
        build_tokenizer(corpus, str(tmp_path / name), vocab_size=1024)
    for filename in TOKENIZER_FILES:
        first = (tmp_path / "a" / filename).read_bytes()
        assert first == (tmp_path / "b" / filename).read_bytes(), filename
        # The shipped files were built in another process: the build is deterministic across
        # processes, and the shipped tokenizer is current with the shipped data.
        with open(os.path.join(llada_train.DEFAULT_TOKENIZER_DIR, filename), "rb") as f:
            assert first == f.read(), f"{filename}: run `python -m llada_train.tokenizer`"


def test_build_small_corpus_pads_vocab_with_reserved(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n123 + 456 = 579.\n")
    build_tokenizer([str(corpus)], str(tmp_path / "tok"), vocab_size=300)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert len(tok) == 300
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.convert_ids_to_tokens(299).startswith("<|reserved_")
    assert 299 in special_ids(tok).all_special
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"  # unseen bytes still encode
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer([str(corpus)], str(tmp_path / "tiny"), vocab_size=100)


def test_load_tokenizer_missing_path():
    with pytest.raises(ValueError, match="/no/such/tokenizer"):
        load_tokenizer("/no/such/tokenizer")


def _word_level_tokenizer(vocab: dict[str, int], **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), **special
    )


def test_special_ids_official_style():
    # Like the official LLaDA2 tokenizer: "<|mask|>" is only in the vocabulary (not declared as
    # mask_token), EOS is the tokenizer's eos_token, and no pad token is set.
    vocab = {"[UNK]": 0, "a": 1, "<|endoftext|>": 7, "<|mask|>": 9}
    tok = _word_level_tokenizer(vocab, eos_token="<|endoftext|>", unk_token="[UNK]")
    ids = special_ids(tok)
    assert (ids.mask_id, ids.eos_id, ids.pad_id) == (9, 7, 7)
    assert {7, 9} <= set(ids.all_special)


def test_special_ids_without_mask_says_what_to_add():
    vocab = {"[UNK]": 0, "a": 1, "<|endoftext|>": 2}
    tok = _word_level_tokenizer(vocab, eos_token="<|endoftext|>", unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"add_special_tokens.*<\|mask\|>"):
        special_ids(tok)
