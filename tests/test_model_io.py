"""HF-format I/O: save -> load gives identical logits; broken checkpoints fail by name."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_train.model.io import (
    INDEX_FILE,
    from_pretrained,
    load_official_weights,
    official_state_dict,
    save_pretrained,
)
from llada_train.model.modeling import LLaDA2MoeModelLM


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_save_load_identical_logits_sharded(tiny_model, tmp_path):
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():  # a non-zero expert bias must survive the round trip too
        tiny_model.model.layers[1].mlp.gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    out = save_pretrained(tiny_model, tmp_path / "ckpt", max_shard_bytes=20_000)
    files = os.listdir(out)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and INDEX_FILE in files and "config.json" in files
    index = json.load(open(os.path.join(out, INDEX_FILE)))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index["weight_map"]
    loaded = from_pretrained(out)
    assert torch.equal(_logits(loaded, ids), _logits(tiny_model, ids))
    bias = loaded.model.layers[1].mlp.gate.expert_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, torch.linspace(-0.1, 0.1, 8))


def test_save_single_file_and_bf16(tiny_model, tmp_path):
    out = save_pretrained(tiny_model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert sorted(os.listdir(out)) == [  # weights, config, generation config, remote code
        "config.json", "configuration_llada2_moe.py", "generation_config.json",
        "model.safetensors", "modeling_llada2_moe.py",
    ]  # fmt: skip
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    loaded = from_pretrained(out, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16


def test_layerwise_gather_export_and_load(tiny_model, tmp_path):
    """The ZeRO-3 path: export and load enter `gather` once per decoder layer and once for the
    rest, never with two layers at a time, and give the same files and weights as without it."""
    entered: list[set[int]] = []
    owner = {id(p): name for name, p in tiny_model.named_parameters()}

    @contextlib.contextmanager
    def gather(params):
        layers = {int(owner[id(p)].split(".")[2]) for p in params if ".layers." in owner[id(p)]}
        entered.append(layers)
        yield

    plain = dict(official_state_dict(tiny_model))
    gathered = dict(official_state_dict(tiny_model, gather=gather))
    n_layers = tiny_model.config.num_hidden_layers
    assert entered == [{i} for i in range(n_layers)] + [set()]
    assert plain.keys() == gathered.keys()
    assert all(torch.equal(plain[k], gathered[k]) for k in plain)
    assert all(t.data_ptr() != plain[k].data_ptr() for k, t in gathered.items())  # CPU copies

    out = save_pretrained(
        tiny_model, tmp_path / "ckpt", state=official_state_dict(tiny_model, gather=gather)
    )
    fresh = LLaDA2MoeModelLM(tiny_model.config)
    untouched = LLaDA2MoeModelLM(tiny_model.config)
    for model in (fresh, untouched):
        owner.update({id(p): name for name, p in model.named_parameters()})
    entered.clear()
    load_official_weights(fresh, out, gather=gather)
    assert entered == [{i} for i in range(n_layers)] + [set()]
    loaded = fresh.state_dict()
    for name, a in tiny_model.state_dict().items():
        assert torch.equal(a, loaded[name]), name
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    load_official_weights(untouched, out, gather=gather, write=False)  # a non-writing rank
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    save_pretrained(tiny_model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.fixture
def saved(tiny_model, tmp_path):
    out = save_pretrained(tiny_model, tmp_path / "ckpt")
    return out, os.path.join(out, "model.safetensors")


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(saved):
    out, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"
    ):
        from_pretrained(out)


def test_unexpected_tensor_is_named(saved):
    out, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.surprise.weight": torch.zeros(2)}))
    with pytest.raises(
        ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.surprise\.weight"
    ):
        from_pretrained(out)


def test_misshaped_tensor_is_named(saved):
    out, path = saved
    _rewrite(
        path, lambda t: t.update({"model.layers.1.attention.dense.weight": torch.zeros(32, 31)})
    )
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.attention\.dense\.weight'.*\[32, 31\].*\[32, 32\]"
    ):
        from_pretrained(out)


def test_config_that_disagrees_with_weights(saved):
    out, _ = saved
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["num_experts"] = 16
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(
        ValueError,
        match=r"(?s)missing tensors: model\.layers\.1\.mlp\.experts\.10.*"
        r"'model\.layers\.1\.mlp\.gate\.weight'.*\[8, 32\].*\[16, 32\]",
    ):
        from_pretrained(out)


def test_init_command_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.model.init", "model=tiny", f"out={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parameters" in proc.stdout
    model = from_pretrained(out)
    config = json.load(open(out / "config.json"))
    assert config["mask_token_id"] is not None and config["eos_token_id"] is not None
    assert os.path.exists(out / "tokenizer.json")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, config["vocab_size"])
    assert not os.path.exists(tmp_path / "outputs")  # the init command leaves no Hydra clutter


def test_generate_cli_answers_from_an_init_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "llada_train.model.init", "model=tiny", f"out={out}"],
        check=True, capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.generate", f"model_dir={out}", "prompt=What is 2 + 3?",
         "sampler=speed", "sampler.gen_length=32", "stream=false"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ">>> What is 2 + 3?" in proc.stdout
    assert "forwards, TPF" in proc.stderr  # the statistics line
    assert os.listdir(tmp_path) == ["tiny"]  # no log files left in the working directory
