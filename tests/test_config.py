"""Config and layering: bad values fail at launch naming the key; libraries never import commands.

Every string option of the schemas is an enum, so Hydra rejects a value outside it while
composing (before any work) and names the key; the sampler's ranges and the one owner of
`block_length` are checked by `check_sampler`, which every training loop calls first.
"""

from __future__ import annotations

import ast
import os

import pytest
from hydra import compose, initialize_config_dir

import llada_train
from llada_train.config import check_sampler, register_configs

PACKAGE = os.path.dirname(llada_train.__file__)
# Modules run by users (`python -m ...`); library code must never import them.
ENTRY_POINTS = {
    "llada_train.sft",
    "llada_train.cpt",
    "llada_train.rl.__main__",
    "llada_train.generate",
    "llada_train.eval.__main__",
    "llada_train.eval.cli",
    "llada_train.model.init",
}


def _compose(entry: str, overrides: list[str]):
    register_configs(entry)
    with initialize_config_dir(config_dir=llada_train.CONF_DIR, version_base="1.3"):
        return compose(entry, overrides=overrides)


@pytest.mark.parametrize(
    ("entry", "override"),
    [
        ("sft", "data.kind=chat"),
        ("sft", "data.on_bad_record=ignore"),
        ("sft", "corruption.weighting=1/t"),
        ("sft", "tracking.mode=onlin"),
        ("sft", "checkpoint.export_dtype=fp16"),
        ("sft", "precision=bf32"),
        ("sft", "sampler.threshold=high"),
        ("sft", "sampler.treshold=0.5"),
        ("rl", "conf.name=ppo"),
        ("rl", "conf.level_weights=uniform"),
        ("rl", "checkpoint.export_dtype=half"),
        ("generate", "device=tpu"),
        ("generate", "dtype=fp8"),
        ("generate", "sampler.top_k=many"),
        ("init", "dtype=float16"),
    ],
)
def test_bad_value_fails_at_composition_naming_the_key(entry, override):
    key = override.split("=")[0]
    with pytest.raises(Exception) as info:
        _compose(entry, [override, *(["init_from=x"] if entry == "rl" else [])])
    text = str(info.value) + str(info.value.__cause__)
    assert key in text


def test_sampler_ranges_and_block_length_owner_checked_at_launch():
    cfg = _compose("sft", ["+recipe=tiny", "block_length=16"])
    # the sampler's block length follows the training one
    assert check_sampler(cfg).block_length == 16 and cfg.sampler.threshold == 0.7
    with pytest.raises(ValueError, match="threshold"):
        check_sampler(_compose("sft", ["sampler.threshold=1.5"]))
    with pytest.raises(ValueError, match="sampler.block_length=16 differs from block_length=32"):
        check_sampler(_compose("sft", ["sampler.block_length=16"]))
    rl = _compose("rl", ["block_length=64", "init_from=x"])
    assert check_sampler(rl).block_length == 64


def test_schedule_and_heldout_values_checked_at_launch():
    from llada_train.config import check_run
    from llada_train.train import check_config

    with pytest.raises(ValueError, match=r"optim.decay_ratio=1.5 must lie in \[0, 1\]"):
        check_run(_compose("sft", ["optim.decay_ratio=1.5"]))
    with pytest.raises(ValueError, match="heldout.files is empty"):
        check_config(_compose("sft", ["heldout.every=10"]), "sft")
    for key in ("checkpoint.save_every", "tracking.log_every"):  # once a ZeroDivisionError
        with pytest.raises(ValueError, match=rf"{key}=0 must be >= 1"):
            check_run(_compose("sft", [f"{key}=0"]))
    with pytest.raises(ValueError, match="heldout.every=-1"):
        check_config(_compose("sft", ["heldout.every=-1"]), "sft")
    with pytest.raises(ValueError, match="heldout.num_questions=0 must be positive"):
        check_config(_compose("sft", ["heldout.num_questions=0"]), "sft")
    with pytest.raises(ValueError, match="heldout.files: /nope/held.jsonl does not exist"):
        missing = ["heldout.every=5", "heldout.files=[/nope/held.jsonl]"]
        check_config(_compose("sft", missing), "sft")


def test_warmup_stable_decay_schedule_hand_values():
    """1000 steps, 5% warmup (50 steps), decay over the last 30% (300 steps) to 0.1."""
    from llada_train.distributed import lr_lambda

    def wsd(step):
        return lr_lambda(step, 1000, 0.05, 0.1, decay_ratio=0.3)

    assert wsd(0) == pytest.approx(1 / 50) and wsd(49) == 1.0
    assert wsd(50) == wsd(500) == wsd(699) == wsd(700) == 1.0  # stable until the decay starts
    assert wsd(850) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert wsd(1000) == pytest.approx(0.1)
    # decay_ratio=1 is the plain warmup + cosine over every step after the warmup
    assert lr_lambda(525, 1000, 0.05, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(525, 1000, 0.05, 0.1, 1.0) == lr_lambda(525, 1000, 0.05, 0.1, 0.95)


def test_decay_that_ends_early_holds_the_floor_hand_values():
    """1000 steps, 5% warmup, a 200-step cosine ending at step 600, then 0.1 to the end."""
    from llada_train.distributed import lr_lambda

    def sched(step):
        return lr_lambda(step, 1000, 0.05, 0.1, decay_ratio=0.2, decay_end_ratio=0.6)

    assert sched(49) == sched(50) == sched(399) == sched(400) == 1.0  # stable until step 400
    assert sched(500) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert sched(600) == sched(800) == sched(999) == pytest.approx(0.1)  # the held floor
    # decay_end_ratio=1 is the schedule without it, step for step
    assert all(
        lr_lambda(k, 1000, 0.05, 0.1, 0.3, 1.0) == lr_lambda(k, 1000, 0.05, 0.1, 0.3)
        for k in range(1000)
    )


def test_decay_end_inside_the_warmup_is_refused():
    from llada_train.config import check_run

    cfg = _compose("sft", ["optim.warmup_ratio=0.1", "optim.decay_end_ratio=0.05"])
    with pytest.raises(ValueError, match="optim.decay_end_ratio"):
        check_run(cfg)


def test_enum_options_read_as_their_strings():
    cfg = _compose("sft", ["tracking.mode=disabled", "corruption.weighting=inv_t"])
    assert cfg.tracking.mode == "disabled" and f"{cfg.corruption.weighting}" == "inv_t"
    assert {"inv_t": 1}[cfg.corruption.weighting] == 1  # dict lookups by the plain string work


def _imports(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = module.split(".")[: -node.level]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_library_module_imports_an_entry_point():
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            if module in ENTRY_POINTS:
                continue
            bad = _imports(path, module) & ENTRY_POINTS
            offenders += [f"{module} imports {b}" for b in sorted(bad)]
    assert not offenders, offenders


def test_tiny_demo_recipe_is_tiny_for_1800_steps():
    """recipes/tiny_demo.yaml (the demo's SFT from the CPT checkpoint) is recipes/tiny.yaml with
    max_steps 1800, the configuration results/robustness/tiny_demo_v6 measured as
    `tiny -- max_steps=1800`."""
    from omegaconf import OmegaConf

    demo = OmegaConf.to_container(_compose("sft", ["+recipe=tiny_demo"]), resolve=True)
    tiny = OmegaConf.to_container(_compose("sft", ["+recipe=tiny"]), resolve=True)
    assert {k for k in demo if demo[k] != tiny[k]} == {"max_steps"}
    assert (demo["max_steps"], tiny["max_steps"]) == (1800, 1200)


def test_tiny_sort_recipes_differ_from_tiny_only_in_data_and_folders():
    """recipes/tiny_sort.yaml (SFT) and recipes/rl/tiny_sort.yaml inherit everything of their
    tiny recipe (model, optimiser, schedule shape, batch), so a change to tiny moves both tasks;
    only the data (and held-out check), folders, block_length 64 (one block per chat) and the SFT
    length (3000 steps: sorting's plateau is longer, docs/learning.md) differ."""
    from omegaconf import OmegaConf

    def plain(entry, recipe):
        overrides = [f"+recipe={recipe}", *(["conf=ebpo"] if entry == "rl" else [])]
        return OmegaConf.to_container(_compose(entry, overrides), resolve=True)

    sort, tiny = plain("sft", "tiny_sort"), plain("sft", "tiny")
    changed = {"data", "checkpoint", "output_dir", "block_length", "sampler", "heldout"}
    changed |= {"max_steps", "corruption", "optim", "moe"}  # sorting pins what it measured with
    assert {k for k in sort if sort[k] != tiny[k]} == changed
    assert (sort["max_steps"], tiny["max_steps"]) == (3000, 1200)
    assert sort["heldout"] == {
        **tiny["heldout"],
        "files": [os.path.join(llada_train.DATA_DIR, "shipped", "sort_sft_eval.jsonl")],
        "every": 250,
    }
    # sorting keeps the corruption and schedule its figures were measured with (issue 26)
    assert sort["corruption"] == {**tiny["corruption"], "t_max": 0.8, "pad_weight": 1.0}
    assert sort["optim"] == {**tiny["optim"], "decay_ratio": 0.3, "decay_end_ratio": 1.0}
    assert sort["moe"] == {**tiny["moe"], "bias_update_rate": 1e-3}
    assert sort["block_length"] == sort["sampler"]["block_length"] == 64
    assert {**sort["sampler"], "block_length": 32} == tiny["sampler"]
    assert sort["data"] == {
        **tiny["data"],
        "train_files": [os.path.join(llada_train.DATA_DIR, "shipped", "sort_sft_train.jsonl")],
        "max_length": 64,
    }
    assert sort["checkpoint"] == {
        **tiny["checkpoint"],
        "eval": {"tasks": ["llada_sort"], "limit": 50},
    }
    rl_sort, rl_tiny = plain("rl", "tiny_sort"), plain("rl", "tiny")
    changed = {"data", "init_from", "output_dir", "block_length", "sampler"}
    assert {k for k in rl_sort if rl_sort[k] != rl_tiny[k]} == changed
    assert rl_sort["block_length"] == rl_sort["sampler"]["block_length"] == 64
    shipped = os.path.join(llada_train.DATA_DIR, "shipped")
    assert rl_sort["data"] == {
        **rl_tiny["data"],
        "train_files": [os.path.join(shipped, "sort_rl_train.jsonl")],
        "eval_files": [os.path.join(shipped, "sort_rl_eval.jsonl")],
    }
    assert (rl_sort["init_from"], rl_sort["output_dir"]) == ("runs/sft_sort", "runs/rl_sort")
