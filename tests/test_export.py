"""Exports load where releases load (issue 29): a model fine-tuned from a directory laid out like
a release (its own remote code, generation config, tokenizer, licence) exports a directory that
`transformers.AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` loads with the
fine-tuned weights; the source's files carry through a chain of fine-tunes; a model trained
from scratch ships llada_train's remote code (never an auto_map naming a missing file); every
export has generation_config.json and a model card (README.md) stating what it is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from llada_train.checkpoint import resolve_model_dir
from llada_train.model.card import (
    ExportInfo,
    describe_run,
    init_info,
    latest_evaluation,
    read_card_metadata,
    write_model_card,
)
from llada_train.model.io import (
    REMOTE_CODE_DIR,
    REMOTE_CODE_FILES,
    from_pretrained,
    save_pretrained,
)
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.tokenizer import load_tokenizer, special_ids
from tests.conftest import tiny_config

RELEASE_MARK = "# release-like remote code of tests/test_export.py: must reach every export\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}

# Loads each directory through transformers (a fresh process with its own module cache, so no
# other test's remote-code modules interfere) and prints the logits of fixed ids.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for d in sys.argv[2:]:
        config = AutoConfig.from_pretrained(d, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            logits = model(ids).logits
        generation = GenerationConfig.from_pretrained(d)
        out[d] = {"logits": logits.tolist(), "config_class": type(config).__name__,
                  "model_class": type(model).__name__,
                  "block_length": getattr(generation, "block_length", None)}
    print(json.dumps(out))
    """
)


def _hf_load(dirs: list[str], ids: torch.Tensor, modules: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(ids.tolist()), *dirs],
        capture_output=True, text=True, timeout=300, env={**ENV, "HF_MODULES_CACHE": modules},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_release(out) -> str:
    """A directory laid out like an official release: weights, config.json with the official
    auto_map, the remote-code pair named by it (marked, so the test can tell it from
    llada_train's own), a generation_config.json with a field of its own, tokenizer files with
    a chat template, a licence; no llada_train.json (not trained here), no model card."""
    tok = load_tokenizer()
    ids = special_ids(tok)
    config = tiny_config(vocab_size=len(tok), eos_token_id=ids.eos_id, pad_token_id=ids.pad_id,
                         mask_token_id=ids.mask_id)  # fmt: skip
    torch.manual_seed(0)
    out = save_pretrained(LLaDA2MoeModelLM(config), out, tokenizer=tok)
    for name in REMOTE_CODE_FILES:
        with open(os.path.join(REMOTE_CODE_DIR, name)) as f:
            code = f.read()
        with open(os.path.join(out, name), "w") as f:
            f.write(RELEASE_MARK + code)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ids.eos_id, "pad_token_id": ids.pad_id,
                   "release_field": "kept"}, f)  # fmt: skip
    with open(os.path.join(out, "LICENSE"), "w") as f:
        f.write("Apache License 2.0 (test)\n")
    for name in ("README.md", "llada_train.json"):
        assert not os.path.exists(os.path.join(out, name))
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(release dir, run dir, export dir) of a real 2-step SFT from the release-like dir."""
    root = tmp_path_factory.mktemp("export")
    release = _make_release(root / "release")
    run = root / "sft"
    cmd = [
        sys.executable, "-m", "llada_train.sft", "+recipe=tiny", f"init_from={release}",
        f"output_dir={run}", "max_steps=2", "micro_batch_size=2", "global_batch_size=4",
        "tracking=disabled", "progress=false", "heldout.every=0", "checkpoint.save_every=2",
        "checkpoint.eval_every_saves=0", "checkpoint.smoke_prompts=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return release, str(run), resolve_model_dir(str(run))


def test_finetuned_export_carries_the_release_files(finetuned):
    release, _, export = finetuned
    for name in REMOTE_CODE_FILES + ("LICENSE",):
        with open(os.path.join(release, name)) as a, open(os.path.join(export, name)) as b:
            assert a.read() == b.read(), name  # the source's own files, not llada_train's
    config = json.load(open(os.path.join(export, "config.json")))
    assert config["auto_map"] == json.load(open(os.path.join(release, "config.json")))["auto_map"]
    gen = json.load(open(os.path.join(export, "generation_config.json")))
    tok = load_tokenizer(export)
    ids = special_ids(tok)
    assert gen["release_field"] == "kept"  # the source's generation config, plus ours
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (ids.eos_id, ids.pad_id)
    assert gen["mask_token_id"] == ids.mask_id and gen["do_sample"] is False
    assert (gen["block_length"], gen["threshold"], gen["editing_threshold"]) == (32, 0.7, 0.5)
    assert gen["decode_presets"]["speed"] == {
        "threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 16
    }  # fmt: skip
    assert tok.chat_template  # tokenizer with its chat template
    assert os.path.exists(os.path.join(export, "tokenizer.json"))


def test_finetuned_export_loads_through_transformers_with_the_tuned_weights(finetuned, tmp_path):
    release, _, export = finetuned
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = _hf_load([release, export], ids, str(tmp_path / "modules"))
    assert loaded[export]["model_class"] == "LLaDA2MoeModelLM"
    assert loaded[export]["config_class"] == "LLaDA2MoeConfig"
    assert loaded[export]["block_length"] == 32  # generation_config.json read by transformers
    hf = torch.tensor(loaded[export]["logits"])
    with torch.no_grad():
        ours = from_pretrained(export)(ids)
    assert torch.allclose(hf, ours, atol=1e-5, rtol=0)
    before = torch.tensor(loaded[release]["logits"])
    assert (hf - before).abs().max() > 1e-4  # the fine-tuned weights, not the release's


def test_finetuned_export_card(finetuned):
    release, run, export = finetuned
    meta = read_card_metadata(export)
    facts = meta["llada_train"]
    assert meta["library_name"] == "transformers" and "sft" in meta["tags"]
    assert "base_model" not in meta  # a local directory has no Hub id
    assert facts["task"] == "sft" and facts["step"] == 2
    assert facts["base_model_dir"] == os.path.abspath(release)
    assert facts["trained_from_scratch"] is False and facts["recipe"] == "tiny"
    # the shipped file of whichever checkout the run's interpreter imports (an editable
    # install may point at another clone than the one under test)
    (data_file,) = facts["data_files"]
    assert data_file.endswith(os.path.join("data", "shipped", "sft_train.jsonl"))
    assert os.path.isfile(data_file)
    assert facts["block_length"] == 32 and facts["t2t_trained"] is True
    assert facts["remote_code"] == "source"
    text = open(os.path.join(export, "README.md")).read()
    needles = [
        f"| Base model | `{os.path.abspath(release)}` |", "+recipe=tiny", "| Steps | 2 of 2",
        "sft_train.jsonl", "| block_length | 32 |", "editing (T2T) trained",
        "| quality | 0.7 | 0.5 | 16 |", "## Evaluation", "trust_remote_code=True",
        "the source model's",
    ]  # fmt: skip
    for needle in needles:
        assert needle in text, needle


def test_chain_of_finetunes_keeps_the_release_files(finetuned, tmp_path):
    """RL (or any stage) from the SFT export exports through the same path: the files carry."""
    release, _, export = finetuned
    out = save_pretrained(from_pretrained(export), tmp_path / "rl", source_dir=export)
    for name in REMOTE_CODE_FILES:
        with open(os.path.join(release, name)) as a, open(os.path.join(out, name)) as b:
            assert a.read() == b.read(), name
    assert json.load(open(os.path.join(out, "generation_config.json")))["block_length"] == 32


def _assert_auto_map_resolves(model_dir):
    auto_map = json.load(open(os.path.join(model_dir, "config.json")))["auto_map"]
    for ref in auto_map.values():
        module, cls = ref.rsplit(".", 1)
        path = os.path.join(model_dir, module + ".py")
        assert os.path.exists(path), ref
        assert f"class {cls}(" in open(path).read() or f"{cls} = " in open(path).read(), ref


def test_from_scratch_export_ships_working_remote_code_and_says_so(tmp_path):
    tok = load_tokenizer()
    ids = special_ids(tok)
    config = tiny_config(vocab_size=len(tok), eos_token_id=ids.eos_id, pad_token_id=ids.pad_id,
                         mask_token_id=ids.mask_id)  # fmt: skip
    model = LLaDA2MoeModelLM(config).eval()
    out = save_pretrained(model, tmp_path / "scratch", tokenizer=tok)
    _assert_auto_map_resolves(out)
    for name in REMOTE_CODE_FILES:  # llada_train's own pair
        assert (
            open(os.path.join(out, name)).read() == open(os.path.join(REMOTE_CODE_DIR, name)).read()
        )
    write_model_card(out, init_info(seed=0))
    meta = read_card_metadata(out)
    assert meta["llada_train"]["trained_from_scratch"] is True
    assert meta["llada_train"]["remote_code"] == "llada_train"
    text = open(os.path.join(out, "README.md")).read()
    assert "none: trained from scratch" in text
    assert (
        "pip install llada_train" in text and "llada_train.model.io import from_pretrained" in text
    )
    # a source without the code its auto_map names: the export still resolves every name
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for name in REMOTE_CODE_FILES:
        os.remove(bare / name)
    again = save_pretrained(model, tmp_path / "again", source_dir=str(bare))
    _assert_auto_map_resolves(again)
    ids_in = torch.randint(0, 90, (1, 8), generator=torch.Generator().manual_seed(1))
    loaded = _hf_load([out], ids_in, str(tmp_path / "modules"))
    with torch.no_grad():
        assert torch.allclose(torch.tensor(loaded[out]["logits"]), model(ids_in), atol=1e-5)


def test_describe_run_reads_hydras_record_and_latest_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "init_from: null\nseed: 3\nmax_steps: 10\nblock_length: 16\n"
        "data: {train_files: [a.jsonl]}\nsampler: {threshold: 0.5, editing_threshold: 0.0, "
        "max_post_steps: 16, block_length: '${block_length}'}\n"
    )
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices: {recipe: tiny}\n  overrides:\n    task: [max_steps=10]\n"
    )
    for step, acc in ((4, 0.25), (8, 0.5)):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "eval_results.json").write_text(json.dumps({
            "step": step, "scores": {"gsm8k": {"exact_match": acc, "exact_match_stderr": 0.1}},
            "sampler": {"preset": "quality", "threshold": 0.7, "editing_threshold": 0.5,
                        "block_length": 16}, "limit": 8, "tpf": 2.0,
        }))  # fmt: skip
    facts = {"task": "cpt", "block_length": 16, "t2t_trained": False}
    info = describe_run(str(run), facts, 10)
    assert info.recorded and info.init_from is None and info.recipe == "tiny"
    assert info.data_files == ["a.jsonl"] and info.sampler["block_length"] == 16
    assert info.command == "python -m llada_train.cpt max_steps=10"
    assert latest_evaluation(str(run / "checkpoints"))["step"] == 8
    assert info.evaluation["scores"]["gsm8k"]["exact_match"] == 0.5
    model_dir = save_pretrained(LLaDA2MoeModelLM(tiny_config()), tmp_path / "hf")
    write_model_card(model_dir, info)
    text = open(os.path.join(model_dir, "README.md")).read()
    assert "none: trained from scratch (seed 3)" in text
    assert "step 8 (an earlier checkpoint), sampler preset `quality`" in text
    assert "| gsm8k | exact_match | 0.5000 |" in text and "exact_match_stderr" not in text
    assert "mask only (M2T): T2T editing NOT trained" in text
    assert "| quality | 0.7 | off | 16 |" in text  # a mask-only model decodes with editing off
    assert read_card_metadata(model_dir)["llada_train"]["t2t_trained"] is False


def test_card_without_a_run_record_says_unknown(tmp_path):
    model_dir = save_pretrained(LLaDA2MoeModelLM(tiny_config()), tmp_path / "hf")
    write_model_card(model_dir, ExportInfo(task="sft", step=1))
    text = open(os.path.join(model_dir, "README.md")).read()
    assert "| Base model | not recorded |" in text and "| Recipe | not recorded |" in text
    assert read_card_metadata(model_dir)["llada_train"]["trained_from_scratch"] is None


def test_card_names_the_hub_base_model_and_keeps_its_licence(tmp_path):
    """A source in the HF cache has a Hub id (base_model metadata); its card's licence carries,
    and an export of that export names the same Hub base model."""
    model = LLaDA2MoeModelLM(tiny_config())
    source = tmp_path / "hub" / "models--inclusionAI--LLaDA2.1-mini" / "snapshots" / "abc123"
    save_pretrained(model, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# LLaDA2.1-mini\n")
    sft = save_pretrained(model, tmp_path / "sft" / "hf", source_dir=str(source))
    write_model_card(sft, ExportInfo(task="sft", step=5, init_from=str(source),
                                     source_dir=str(source), recorded=True))  # fmt: skip
    meta = read_card_metadata(sft)
    assert meta["base_model"] == "inclusionAI/LLaDA2.1-mini" and meta["license"] == "apache-2.0"
    assert meta["llada_train"]["trained_from_scratch"] is False
    rl = save_pretrained(model, tmp_path / "rl" / "hf", source_dir=sft)
    write_model_card(rl, ExportInfo(task="rl", step=1, init_from=sft, source_dir=sft))
    meta = read_card_metadata(rl)
    assert meta["base_model"] == "inclusionAI/LLaDA2.1-mini" and meta["license"] == "apache-2.0"
