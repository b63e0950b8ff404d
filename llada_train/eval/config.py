"""Typed schema of the eval entry point (`conf/eval.yaml` composes over it, struct mode).

Contract: `EvalConfig` lists every key of `python -m llada_train.eval` (a typo fails at launch);
`register_eval_schema()` stores it as `eval_schema` in Hydra's ConfigStore;
`as_eval_config(node)` turns a partial dict / DictConfig (e.g. from a training loop, which cannot
compose a second Hydra config inside its own) into a complete validated DictConfig; a missing
`sampler` is the Speed preset with `block_length: null` (the block length the model was trained
with, `sampler.sampler_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from llada_train.config import ModelDtype, TrackingConfig
from llada_train.sampler import SamplerConfig, sampler_config

DEFAULT_TASKS = ["llada_arith_gen", "llada_arith_mc", "llada_code"]


@dataclass
class EvalConfig:
    model_dir: str | None = None  # an HF-format dir, a checkpoint's hf/ dir, or the checkpoint
    watch: str | None = None  # RUN_DIR: evaluate each new complete checkpoint of a training run
    once: bool = False  # watch: evaluate what is there, then exit
    poll_s: float = 60.0  # watch: seconds between scans of RUN_DIR/checkpoints
    overwrite: bool = False  # watch: re-evaluate checkpoints that already have results
    out: str | None = None  # results JSON; null = next to the checkpoint / inside model_dir
    tracking_dir: str | None = None  # W&B + metrics.jsonl; null = RUN_DIR/eval or the out dir
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    limit: float | None = None  # docs per task (a fraction when < 1); null = all
    num_fewshot: int | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # over every generate task's own
    include_path: str | None = None  # task YAML folder; null = <repo>/eval/tasks
    include_defaults: bool | None = None  # lm-eval's own tasks; null = only when one is asked
    mc_samples: int = 32  # Monte Carlo samples per log-likelihood request
    mc_batch_size: int = 64  # rows per ELBO forward
    batch_size: int = 16  # prompts per sampler call
    max_gen_toks: int | None = None  # for tasks that set none; null = sampler.gen_length
    max_length: int | None = None  # context budget in tokens; null = min(config, 4096)
    chat_template: bool | None = None  # wrap each context as a user turn; null = as trained
    # (the checkpoint's llada_train.json: SFT/RL true, CPT false; true when it has none)
    system: str | None = None
    seed: int = 1234  # mask draws of the ELBO, sampling, lm-eval's few-shot and python seeds
    device: str = "auto"
    dtype: ModelDtype = ModelDtype.auto
    bootstrap_iters: int = 1000  # lm-eval stderr bootstrap (0 = off)
    confirm_run_unsafe_code: bool = False  # lm-eval's gate for tasks such as humaneval
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # a conf/sampler node


def register_eval_schema() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def as_eval_config(node: DictConfig | dict | None = None) -> DictConfig:
    """A complete, validated eval config from a partial one (unknown keys raise)."""
    cfg = OmegaConf.structured(EvalConfig)
    cfg.sampler.block_length = None  # by default the block length the model was trained with
    if node is not None:
        cfg = OmegaConf.merge(cfg, node)
    sampler_config(cfg.sampler)  # ranges checked before any work
    return cfg
