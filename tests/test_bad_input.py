"""One clean message for every bad input, before any training or model loading: the message
names the file / line / key and what to change; the entry points print it without a traceback
and exit with status 2 (HYDRA_FULL_ERROR=1 keeps the full trace)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llada_train import CONF_DIR
from llada_train.checkpoint import complete_checkpoints, save_checkpoint
from llada_train.config import register_configs
from llada_train.data.pipeline import read_records
from llada_train.errors import check_known_keys, check_writable, disk_full_message
from llada_train.eval.evaluate import check_tasks
from llada_train.generate import generate
from llada_train.model.io import from_pretrained, save_pretrained
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.tokenizer import load_tokenizer, special_ids
from llada_train.train import check_config
from tests.conftest import tiny_config
from tests.test_durability import engine  # noqa: F401 - the in-process DeepSpeed engine

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = load_tokenizer()
    ids = special_ids(tok)
    config = tiny_config(vocab_size=len(tok), eos_token_id=ids.eos_id, pad_token_id=ids.pad_id,
                         mask_token_id=ids.mask_id, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return save_pretrained(LLaDA2MoeModelLM(config), tmp_path_factory.mktemp("m") / "hf",
                           tokenizer=tok)  # fmt: skip


@pytest.fixture
def truncated_dir(model_dir, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(model_dir, out)
    weights = out / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 100)
    return str(out)


def compose_train(*overrides: str):
    register_configs("sft")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="sft", overrides=["+recipe=tiny", *overrides])


def test_non_utf8_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        list(read_records([str(path)]))
    json_path = tmp_path / "chats.json"
    json_path.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}]')
    with pytest.raises(ValueError, match=rf"{json_path}:3: not UTF-8 text \(byte 0xff"):
        list(read_records([str(json_path)]))


def test_empty_data_file_is_named(tmp_path):
    full, empty = tmp_path / "full.jsonl", tmp_path / "empty.jsonl"
    full.write_text('{"text": "x"}\n')
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{empty}: no records \(the file is empty\)"):
        list(read_records([str(full), str(empty)]))


def test_truncated_weights_fail_with_the_path_before_loading(truncated_dir):
    weights = os.path.join(truncated_dir, "model.safetensors")
    with pytest.raises(ValueError, match=rf"{weights}: not a complete safetensors file"):
        from_pretrained(truncated_dir)
    with open(weights, "r+b") as f:  # a file cut inside its header
        f.truncate(20)
    with pytest.raises(ValueError, match="header of .* bytes in a file of 20"):
        from_pretrained(truncated_dir)


def test_model_dir_without_tokenizer_files(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(model_dir, "config.json"), bare)
    with pytest.raises(ValueError, match=rf"{bare}: no tokenizer files"):
        load_tokenizer(str(bare))


def test_plus_added_typo_key_is_refused():
    cfg = compose_train("+optim.lrr=1")
    assert OmegaConf.select(cfg, "optim.lrr") == 1  # Hydra accepted it, so we must refuse
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*valid keys of optim"):
        check_known_keys(cfg)
    check_known_keys(compose_train("optim.lr=1e-4"))  # every shipped key passes


def test_block_length_must_divide_max_length():
    cfg = compose_train("data.max_length=100", "block_length=32")
    with pytest.raises(ValueError, match="data.max_length=100 is not a multiple of block_length"
                                         "=32.*data.max_length=96"):  # fmt: skip
        check_config(cfg, "sft")
    check_config(compose_train("data.max_length=128", "block_length=32"), "sft")


def generate_cfg(model_dir, **overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[f"model_dir={model_dir}"])
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_generate_refuses_empty_and_too_long_prompts_before_loading(truncated_dir, model_dir):
    # The truncated weights prove the order: the prompt is judged before any weight is read.
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(generate_cfg(truncated_dir, prompt="  "))
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(generate_cfg(truncated_dir, prompts=["hi", ""]))
    long = "1 " * 40  # 80 tokens + gen_length 16 > 64 positions
    cfg = generate_cfg(model_dir, prompt=long)
    cfg.sampler.gen_length = 16
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=64"):
        generate(cfg)


def test_unwritable_checkpoint_dir_is_refused_at_launch(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(ValueError, match=rf"checkpoint directory {blocker}/checkpoints is not "
                                         "writable"):  # fmt: skip
        check_writable(str(blocker / "checkpoints"), "checkpoint directory")
    check_writable(str(tmp_path / "fine" / "checkpoints"), "checkpoint directory")


def test_full_disk_while_saving_is_one_clear_message(engine, tmp_path):  # noqa: F811
    """A real save under a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes
    fail with EFBIG, or torch's stream writer reports 'file write failed')."""
    first = save_checkpoint(engine, str(tmp_path), 1, {"step": 1}, True, 0, True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ValueError) as info:
            save_checkpoint(engine, str(tmp_path), 2, {"step": 2}, True, 0, True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert message.startswith("step 2: saving the checkpoint failed: could not write ")
    assert "no space left on device or file too large" in message and "intact" in message
    assert [p for _, p in complete_checkpoints(str(tmp_path))] == [first]
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]  # the partial save is gone
    assert disk_full_message(ValueError("x"), str(tmp_path)) is None  # other errors: untouched


def test_unknown_eval_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown eval task\(s\) \['nope'\].*'llada_arith_gen'"):
        check_tasks(["llada_arith_gen", "nope"], None, False)
    check_tasks(["llada_arith_gen"], None, None)


def test_cli_prints_one_line_exits_2_and_keeps_the_trace_on_request(truncated_dir):
    cmd = [sys.executable, "-m", "llada_train.generate", f"model_dir={truncated_dir}", "prompt="]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prompt is empty")
    assert "Traceback" not in proc.stderr
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**ENV, "HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert full.returncode != 0 and "Traceback" in full.stderr and "prompt is empty" in full.stderr


@pytest.mark.parametrize(
    "entry, key, hint",
    [
        (["llada_train.rl", "conf=ebpo"], "init_from", "init_from=runs/sft"),
        (["llada_train.generate"], "model_dir", "model_dir="),
        (["llada_train.model.init"], "out", "out="),
    ],
)
def test_missing_mandatory_value_is_one_line_exit_2(tmp_path, entry, key, hint):
    # the users' literal command, run in an empty directory (no recipe, no init_from)
    proc = subprocess.run([sys.executable, "-m", *entry], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: missing mandatory config value '{key}'") and hint in last
    assert "Traceback" not in proc.stderr and "MissingMandatoryValue" not in proc.stderr


def test_rl_dry_run_sized_by_plan_model_needs_no_init_from(tmp_path):
    # the memory plan of a model whose weights are not on disk yet (docs/memory.md)
    cmd = [sys.executable, "-m", "llada_train.rl", "conf=ebpo", "plan.model=mini",
           "deepspeed=zero3", "dry_run=true", "plan.num_gpus=8", "plan.gpu_gb=80"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory plan: peak" in proc.stdout and "per GPU on 8 x 80 GB" in proc.stdout
