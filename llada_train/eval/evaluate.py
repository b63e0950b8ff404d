"""Evaluate one model (a directory, a checkpoint, or a model in memory) through lm-eval.

Contract:
- `run_lm_eval(lm, cfg)` runs `lm_eval.simple_evaluate(model=lm, ...)` with a `TaskManager`
  over `cfg.include_path` (default `<repo>/eval/tasks`; lm-eval's own tasks are indexed only
  when a requested task is not found there, or when `include_defaults` says so: indexing them
  costs ~10 s) and returns the summary written to disk: per-task scores (lm-eval's metric names
  without the ",none" filter suffix), the sampler preset and every knob, generation TPF and
  tokens/s, ELBO settings and the mean standard error, wall time.
- `evaluate_checkpoint(ckpt_dir, eval_cfg, ...)` evaluates a training checkpoint
  (`.../checkpoints/step_N`, or its `hf/`, or any HF-format dir), writes the summary atomically
  to `<checkpoint>/eval_results.json` (or `out`), logs the flat metrics to a `Tracker` at the
  checkpoint's step when one is given, and returns the summary. With `model=`/`tokenizer=` it
  evaluates the model in memory instead of loading the directory (in-process evaluation during
  training; the caller puts the model on the device, gathers ZeRO-3 weights around the call,
  and runs it on one rank).
- `flat_metrics(summary)` -> {"eval/<task>/<metric>": value, "eval/tpf": ...} for W&B.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from llada_train import REPO_ROOT
from llada_train.checkpoint import COMPLETE
from llada_train.config import TrackingConfig
from llada_train.eval.config import as_eval_config
from llada_train.model.io import training_default
from llada_train.sampler import sampler_config

logger = logging.getLogger(__name__)

TASKS_DIR = os.path.join(REPO_ROOT, "eval", "tasks")
RESULTS_FILE = "eval_results.json"
ERROR_FILE = "eval_error.json"
HF_SUBDIR = "hf"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a model directory sits: the HF dir to load, its checkpoint (if any) and step."""

    model_dir: str
    checkpoint_dir: str | None
    step: int | None


def resolve_target(path: str) -> Target:
    """A checkpoint dir (holding hf/ and COMPLETE.json), its hf/ dir, or a plain model dir."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, HF_SUBDIR)):
        return Target(os.path.join(path, HF_SUBDIR), path, _checkpoint_step(path))
    parent = os.path.dirname(path)
    if os.path.basename(path) == HF_SUBDIR and os.path.exists(os.path.join(parent, COMPLETE)):
        return Target(path, parent, _checkpoint_step(parent))
    return Target(path, None, None)


def _checkpoint_step(ckpt_dir: str) -> int | None:
    try:
        with open(os.path.join(ckpt_dir, COMPLETE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        name = os.path.basename(ckpt_dir)
        return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def build_task_manager(tasks: list[str], include_path: str | None, include_defaults: bool | None):
    """TaskManager over our task folder; lm-eval's own tasks only when needed (see module doc)."""
    from lm_eval.tasks import TaskManager

    path = os.path.abspath(include_path or TASKS_DIR)
    if include_defaults is None:
        ours = TaskManager(include_path=path, include_defaults=False)
        known = set(ours.all_tasks) | set(ours.all_groups) | set(ours.all_tags)
        if all(task in known for task in tasks):
            return ours
        include_defaults = True
    return TaskManager(include_path=path, include_defaults=include_defaults)


def check_tasks(tasks: list[str], include_path: str | None, include_defaults: bool | None):
    """The task manager of `tasks`, or a ValueError listing the valid task names when one is
    unknown (checked before any model is loaded)."""
    if not tasks:
        raise ValueError("tasks is empty: name at least one, e.g. tasks=[llada_arith_gen]")
    manager = build_task_manager(tasks, include_path, include_defaults)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        from lm_eval.tasks import TaskManager

        path = os.path.abspath(include_path or TASKS_DIR)
        ours = sorted(TaskManager(include_path=path, include_defaults=False).all_tasks)
        raise ValueError(
            f"unknown eval task(s) {unknown}; the tasks of {path}: {ours}; lm-eval's own tasks: "
            "`lm_eval --tasks list`"
        )
    return manager


def make_lm(cfg: DictConfig, model_dir: str | None = None, model=None, tokenizer=None):
    """The `llada` lm-eval model of `cfg` (its sampler node and ELBO settings)."""
    from llada_train.eval.lm import LLaDALM  # imports lm_eval (slow): only when evaluating

    return LLaDALM(
        pretrained=model_dir if model is None else None,
        model=model,
        tokenizer=tokenizer,
        device=cfg.device,
        dtype=cfg.dtype,
        sampler_config=sampler_config(cfg.sampler, model_dir),
        batch_size=cfg.batch_size,
        mc_samples=cfg.mc_samples,
        mc_batch_size=cfg.mc_batch_size,
        chat_template=training_default("chat_template", cfg.chat_template, model_dir, True),
        system=cfg.system,
        max_gen_toks=cfg.max_gen_toks,
        max_length=cfg.max_length,
        seed=cfg.seed,
    )


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value >= 1 and float(value).is_integer() else float(value)


def run_lm_eval(lm, cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `lm` on `cfg.tasks` with lm-eval; the summary (see the module docstring)."""
    import lm_eval

    from llada_train.eval.lm import preset_name

    tasks = list(cfg.tasks)
    start = time.perf_counter()
    task_manager = check_tasks(tasks, cfg.include_path, cfg.include_defaults)
    gen_kwargs = OmegaConf.to_container(cfg.gen_kwargs) if cfg.gen_kwargs else None
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=_limit(cfg.limit),
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
        gen_kwargs=gen_kwargs,
        task_manager=task_manager,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
    )
    speed = lm.speed_stats()
    return {
        "scores": _scores(raw["results"]),
        "tasks": tasks,
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "sampler": {
            "preset": preset_name(lm.sampler_config),
            **dataclasses.asdict(lm.sampler_config),
        },
        "chat_template": lm.use_chat_template,
        "loglikelihood": {
            "mc_samples": lm.mc_samples,
            "standard_error_mean": _finite_or_none(speed["ll_standard_error_mean"]),
            "requests": speed["ll_requests"],
            "forwards": speed["ll_forwards"],
            "wall_s": speed["ll_wall_s"],
        },
        "tpf": speed["tpf"],
        "tokens_per_s": speed["tokens_per_s"],
        "generation": {k: speed[k] for k in ("num_tokens", "num_forwards", "num_m2t", "num_t2t")}
        | {"wall_s": speed["generate_wall_s"]},
        "wall_time_s": time.perf_counter() - start,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
        "n_samples": {task: v.get("effective") for task, v in raw.get("n-samples", {}).items()},
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _scores(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """lm-eval's {"task": {"acc,none": x, "alias": ...}} -> {"task": {"acc": x}} (numbers only);
    a filter other than none stays in the name ("exact_match/strict-match")."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        out = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            out[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        scores[task] = out
    return scores


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary as flat W&B metrics: eval/<task>/<metric>, eval/tpf, eval/tokens_per_s..."""
    flat = {
        f"eval/{task}/{metric}": value
        for task, metrics in summary["scores"].items()
        for metric, value in metrics.items()
        if math.isfinite(value)
    }
    flat["eval/tpf"] = summary["tpf"]
    flat["eval/tokens_per_s"] = summary["tokens_per_s"]
    flat["eval/wall_time_s"] = summary["wall_time_s"]
    se = summary["loglikelihood"]["standard_error_mean"]
    if se is not None:
        flat["eval/ll_standard_error_mean"] = se
    return flat


def write_json(obj: dict[str, Any], path: str) -> None:
    """Write atomically (temporary sibling + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def results_path(target: Target, out: str | None) -> str:
    if out:
        return os.path.abspath(out)
    return os.path.join(target.checkpoint_dir or target.model_dir, RESULTS_FILE)


def evaluate_checkpoint(
    ckpt_dir: str,
    eval_cfg: DictConfig | dict | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    step: int | None = None,
    tracker: Any = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint at `ckpt_dir` (see the module docstring); returns the summary.

    eval_cfg: an `EvalConfig`-shaped node or dict, partial allowed (e.g. {"tasks": [...],
    "limit": 50, "sampler": {...}}); missing keys take the schema defaults.
    model/tokenizer: evaluate this in-memory model instead of loading `ckpt_dir`'s weights.
    step: W&B step; default the checkpoint's step (COMPLETE.json or the step_N name), else 0.
    tracker: a `llada_train.tracking.Tracker` to log `flat_metrics` to (None: no logging).
    out: results path; default `<checkpoint>/eval_results.json` (or `<model_dir>/...`).
    """
    cfg = as_eval_config(eval_cfg)
    target = resolve_target(ckpt_dir)
    step = step if step is not None else (target.step if target.step is not None else 0)
    path = results_path(target, out or cfg.out)
    start = time.perf_counter()
    lm = make_lm(cfg, target.model_dir, model=model, tokenizer=tokenizer)
    try:
        summary = run_lm_eval(lm, cfg)
    finally:
        del lm  # free the weights before the next checkpoint (the watcher loops)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = {
        "model_dir": target.model_dir,
        "checkpoint": target.checkpoint_dir,
        "step": step,
        **summary,
        "total_wall_time_s": time.perf_counter() - start,
        "time": time.time(),
    }
    write_json(summary, path)
    logger.info("eval step %d: %s -> %s", step, _short_scores(summary), path)
    if tracker is not None:
        tracker.log(flat_metrics(summary), step=step)
    return summary


def _short_scores(summary: dict[str, Any]) -> str:
    parts = [
        f"{task}/{metric}={value:.4f}"
        for task, metrics in summary["scores"].items()
        for metric, value in metrics.items()
        if not metric.endswith("_stderr")
    ]
    return ", ".join(parts) + f", TPF {summary['tpf']:.2f}, {summary['tokens_per_s']:.1f} tok/s"


def make_tracker(cfg: DictConfig, tracking_dir: str, run_name: str):
    """A Tracker writing to `tracking_dir` (None when tracking is disabled). It never truncates
    earlier lines of metrics.jsonl: results of earlier checkpoints stay."""
    if cfg.tracking.mode == "disabled":
        return None
    from llada_train.tracking import Tracker

    tracking = TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))
    tracking.run_name = tracking.run_name or run_name
    return Tracker(
        tracking,
        tracking_dir,
        config_dict=OmegaConf.to_container(cfg, resolve=True),
        is_main=True,
        resume_step=sys.maxsize,  # Tracker drops lines after resume_step: keep them all
        job_type="eval",
    )
