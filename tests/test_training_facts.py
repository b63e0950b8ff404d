"""Decode-relevant training facts (`llada_train.json` next to config.json): written with every
export of a training run, and the default of generate, eval (our entry point and lm-eval's CLI
model) and RL; an explicit different value wins with a warning."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from llada_train.eval.config import as_eval_config
from llada_train.eval.evaluate import make_lm
from llada_train.eval.lm import LLaDALM
from llada_train.model.io import (
    TRAINING_FACTS,
    load_training_facts,
    save_pretrained,
    save_training_facts,
    training_default,
)
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.sampler import sampler_config
from llada_train.tokenizer import load_tokenizer, special_ids
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny export as a run trained with 16-token blocks on raw text (CPT) writes it."""
    tok = load_tokenizer()
    ids = special_ids(tok)
    config = tiny_config(vocab_size=len(tok), eos_token_id=ids.eos_id, pad_token_id=ids.pad_id,
                         mask_token_id=ids.mask_id)  # fmt: skip
    torch.manual_seed(0)
    out = save_pretrained(LLaDA2MoeModelLM(config), tmp_path_factory.mktemp("m") / "hf",
                          tokenizer=tok)  # fmt: skip
    save_training_facts(out, {"block_length": 16, "chat_template": False, "task": "cpt"})
    return out


def test_sampler_config_takes_the_trained_block_length(trained_dir):
    node = {"threshold": 0.5, "block_length": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default path is silent
        assert sampler_config(node, trained_dir).block_length == 16
        assert sampler_config(node).block_length == 32  # no model: the preset value
        assert sampler_config({**node, "block_length": 16}, trained_dir).block_length == 16
    with pytest.warns(UserWarning, match=r"block_length=32 differs from the block_length=16"):
        assert sampler_config({**node, "block_length": 32}, trained_dir).block_length == 32


def test_eval_and_lm_eval_cli_model_use_the_trained_facts(trained_dir):
    lm = make_lm(as_eval_config({"tracking": {"mode": "disabled"}}), trained_dir)
    assert lm.block_length == 16 and lm.sampler_config.block_length == 16  # ELBO and decoding
    assert lm.use_chat_template is False  # trained on raw text
    cli = LLaDALM(pretrained=trained_dir, sampler="speed")  # `--model_args pretrained=DIR`
    assert cli.block_length == 16
    with pytest.warns(UserWarning, match="block_length=64 differs"):
        assert LLaDALM(pretrained=trained_dir, block_length=64).block_length == 64


def test_rl_and_generate_defaults(trained_dir, tmp_path):
    assert training_default("block_length", None, trained_dir, 32) == 16  # RL's init_from
    assert training_default("chat_template", None, trained_dir, True) is False  # generate
    assert training_default("block_length", None, str(tmp_path), 32) == 32  # no facts
    assert load_training_facts(str(tmp_path)) == {}
    (tmp_path / TRAINING_FACTS).write_text("{not json")
    with pytest.raises(ValueError, match=TRAINING_FACTS):
        load_training_facts(str(tmp_path))


def test_every_training_export_carries_its_facts(tmp_path):
    """A real SFT run with 16-token blocks: its export says so."""
    from tests.test_train import run_entry

    out = tmp_path / "run"
    run_entry("sft", out, "max_steps=2", "block_length=16", "checkpoint.smoke_prompts=0")
    hf = os.path.join(out, "checkpoints", "step_00000002", "hf")
    with open(os.path.join(hf, TRAINING_FACTS)) as f:
        facts = json.load(f)
    assert facts == {"block_length": 16, "chat_template": True, "task": "sft",
                     "max_length": facts["max_length"], "t2t_trained": True,
                     "step": 2}  # fmt: skip
    assert sampler_config({"block_length": None}, hf).block_length == 16
