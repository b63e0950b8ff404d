"""The model card (README.md) and decode settings of an export: what the checkpoint is.

Contract:
- `describe_run(run_dir, facts, step)` -> `ExportInfo`: what a training run knows of its export:
  task, step, the model it was fine-tuned from (`init_from`, resolved to a model directory),
  recipe, data files, block_length, whether T2T was trained (the `t2t_trained` fact), the
  corruption and sampler nodes, LoRA, and the run's latest evaluation (the newest
  `eval_results.json` among its checkpoints). The run's settings come from the record Hydra
  writes into the run directory (`.hydra/config.yaml`, `.hydra/hydra.yaml`: every entry point
  runs with `hydra.run.dir=${output_dir}`); without one (a loop called from Python) those
  fields are unknown, the card says so, and the export ships llada_train's remote code.
- `generation_fields(info)`: the decode settings written into generation_config.json as custom
  fields (transformers keeps unknown keys as attributes): block_length, threshold,
  editing_threshold (null = M2T only, always for a model not trained on T2T), max_post_steps,
  gen_length, and `decode_presets` (the Quality and Speed modes of conf/sampler/).
- `write_model_card(model_dir, info)`: README.md with HF card metadata (YAML front matter:
  base_model when a Hub id is known, library_name, pipeline_tag, tags, and an `llada_train`
  block of the facts) and a body stating the same for people, with the loading calls. The
  card is written at the save, before the checkpoint's own evaluation (it runs after the save
  and writes `<checkpoint>/eval_results.json`): "latest evaluation" is the newest one of the
  run at that moment, with its step.
- The base model's Hub id is known when the source directory is in the HF cache
  (`.../models--ORG--NAME/snapshots/...`), else inherited from the source's own card (an
  export of ours); a local path is named in the body only. The source card's `license` is
  carried into the metadata.
"""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

CARD_FILE = "README.md"
RESULTS_FILE = "eval_results.json"  # llada_train.eval.evaluate.RESULTS_FILE (not imported: heavy)
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)")
_STAGES = {
    "sft": "supervised fine-tuning (SFT)",
    "cpt": "continued pre-training (CPT)",
    "rl": "RL post-training",
    "init": "fresh initialisation (no training)",
}


@dataclass
class ExportInfo:
    """What an export's card and generation config say; None = not known."""

    task: str | None = None  # sft | cpt | rl | init
    step: int | None = None
    init_from: str | None = None  # as configured (a model dir, checkpoint or run dir)
    source_dir: str | None = None  # init_from resolved to a model directory
    recipe: str | None = None
    command: str | None = None  # the entry point and its command-line overrides
    data_files: list[str] = field(default_factory=list)
    block_length: int | None = None
    t2t_trained: bool | None = None
    corruption: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None  # the run's sampler node (smoke samples, rollouts)
    lora: bool = False
    seed: int | None = None
    max_steps: int | None = None
    evaluation: dict[str, Any] | None = None  # the newest eval_results.json of the run
    recorded: bool = False  # whether the run's settings were found (Hydra's record)


# ---------------------------------------------------------------------------- the run
def describe_run(run_dir: str, facts: dict[str, Any] | None, step: int) -> ExportInfo:
    """The `ExportInfo` of the export of `step` of the run in `run_dir` (module docstring)."""
    facts = facts or {}
    info = ExportInfo(
        task=facts.get("task"),
        step=step,
        block_length=facts.get("block_length"),
        t2t_trained=facts.get("t2t_trained"),
    )
    cfg, choices, overrides = _hydra_record(run_dir)
    if cfg is not None:
        info.recorded = True
        info.init_from = cfg.get("init_from") or None
        info.recipe = choices.get("recipe")
        if info.task:
            info.command = " ".join([f"python -m llada_train.{info.task}", *overrides])
        data = cfg.get("data") or {}
        for key in ("train_files", "eval_files", "files"):
            info.data_files += [str(f) for f in data.get(key) or []]
        info.corruption = cfg.get("corruption")
        info.sampler = cfg.get("sampler")
        info.lora = bool((cfg.get("lora") or {}).get("enabled"))
        info.seed = cfg.get("seed")
        info.max_steps = cfg.get("max_steps")
        if info.block_length is None:
            info.block_length = cfg.get("block_length")
    if info.init_from:
        from llada_train.checkpoint import resolve_model_dir  # lazy: checkpoint imports us

        try:
            info.source_dir = resolve_model_dir(info.init_from)
        except ValueError:
            info.source_dir = None  # moved or deleted since the launch: the card says so
    info.evaluation = latest_evaluation(os.path.join(run_dir, "checkpoints"))
    return info


_REMEMBERED: dict[str, tuple[dict | None, dict, list[str]]] = {}  # run dir -> its record


def remember_hydra_record(run_dir: str) -> None:
    """Read the run's Hydra record now and keep it for every later card of this process. Called
    by `run.open_run` as soon as the run holds its output-dir lock: a second run refused on the
    same dir still rewrites `.hydra/` before it is refused (Hydra writes it before the task),
    and the live run's cards must not take that run's init_from, data or recipe."""
    _REMEMBERED[os.path.abspath(run_dir)] = _hydra_record(run_dir)


def _hydra_record(run_dir: str) -> tuple[dict | None, dict, list[str]]:
    """(resolved config, group choices, command-line overrides) of the run, from Hydra's record
    in `run_dir` (or in the output dir of the Hydra job of this process); (None, {}, []).
    A record kept by `remember_hydra_record` comes first."""
    if os.path.abspath(run_dir) in _REMEMBERED:
        return _REMEMBERED[os.path.abspath(run_dir)]
    dirs = [os.path.join(run_dir, ".hydra")]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            runtime = HydraConfig.get().runtime
            dirs.append(os.path.join(runtime.output_dir, HydraConfig.get().output_subdir or ""))
    except (ImportError, ValueError, AttributeError):
        pass
    for d in dirs:
        path = os.path.join(d, "config.yaml")
        if not os.path.exists(path):
            continue
        try:
            return _read_record(d)
        except Exception:  # noqa: BLE001 - a card must never stop a save
            continue
    return None, {}, []


def _read_record(hydra_dir: str) -> tuple[dict, dict, list[str]]:
    from omegaconf import OmegaConf

    raw = OmegaConf.load(os.path.join(hydra_dir, "config.yaml"))
    try:
        cfg = OmegaConf.to_container(raw, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve
        cfg = OmegaConf.to_container(raw, resolve=False)
    choices: dict = {}
    overrides: list[str] = []
    hydra_file = os.path.join(hydra_dir, "hydra.yaml")
    if os.path.exists(hydra_file):
        with open(hydra_file) as f:
            hydra = (yaml.safe_load(f) or {}).get("hydra", {})
        choices = (hydra.get("runtime") or {}).get("choices") or {}
        overrides = (hydra.get("overrides") or {}).get("task") or []
    return cfg, choices, [str(o) for o in overrides]


def latest_evaluation(ckpt_root: str) -> dict[str, Any] | None:
    """The newest (highest step) readable `eval_results.json` of the checkpoints in
    `ckpt_root`: {"step", "scores", "sampler", "tasks", "limit", "tpf"}; None when none."""
    found = []
    for path in glob.glob(os.path.join(ckpt_root, "step_*", RESULTS_FILE)):
        try:
            with open(path) as f:
                summary = json.load(f)
            if isinstance(summary, dict) and isinstance(summary.get("scores"), dict):
                found.append((int(summary.get("step", 0)), summary))
        except (OSError, ValueError, TypeError):
            continue  # being written, or damaged: not a result
    if not found:
        return None
    step, summary = max(found, key=lambda item: item[0])
    keys = ("scores", "sampler", "tasks", "limit", "num_fewshot", "tpf", "chat_template")
    return {"step": step, **{k: summary.get(k) for k in keys}}


# ---------------------------------------------------------------------------- decode settings
def generation_fields(info: ExportInfo) -> dict[str, Any]:
    """Custom fields of generation_config.json: the decode settings of this model (module
    docstring). The run's sampler node gives the values; block_length is the trained one."""
    from llada_train.sampler import PRESETS

    sampler = info.sampler or {}
    fields: dict[str, Any] = {}
    block_length = info.block_length or sampler.get("block_length")
    if block_length:
        fields["block_length"] = int(block_length)
    for key in ("threshold", "editing_threshold", "max_post_steps", "gen_length"):
        if key in sampler:
            fields[key] = sampler[key]
    if info.t2t_trained is False:
        fields["editing_threshold"] = None  # T2T proposals of a mask-only model are arbitrary
    fields["decode_presets"] = {
        name: {
            "threshold": threshold,
            "editing_threshold": None if info.t2t_trained is False else editing,
            "max_post_steps": post,
        }
        for name, (threshold, editing, post) in PRESETS.items()
    }
    return fields


# ---------------------------------------------------------------------------- the card
def hub_id(source_dir: str | None) -> str | None:
    """The Hub id of the model in `source_dir` (module docstring), or None."""
    if not source_dir:
        return None
    m = _HUB_CACHE.search(os.path.abspath(source_dir))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    meta = read_card_metadata(source_dir)
    base = meta.get("base_model")
    return base if isinstance(base, str) else None


def read_card_metadata(model_dir: str) -> dict[str, Any]:
    """The YAML front matter of `model_dir`'s README.md; {} when none."""
    try:
        with open(os.path.join(model_dir, CARD_FILE), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        meta = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def remote_code_origin(model_dir: str, info: ExportInfo) -> str:
    """'llada_train' when the export's remote code is llada_train's own pair, else 'source'."""
    from llada_train.model.io import REMOTE_CODE_DIR, REMOTE_CODE_FILES

    ours = all(
        os.path.exists(os.path.join(model_dir, n))
        and filecmp.cmp(os.path.join(model_dir, n), os.path.join(REMOTE_CODE_DIR, n), False)
        for n in REMOTE_CODE_FILES
    )
    return "llada_train" if ours else "source"


def write_model_card(model_dir: str, info: ExportInfo) -> str:
    """Write README.md (module docstring) into the export `model_dir`; returns its path."""
    path = os.path.join(model_dir, CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_model_card(model_dir, info))
    return path


def render_model_card(model_dir: str, info: ExportInfo) -> str:
    from llada_train.model.config import LLaDA2MoeConfig

    config = LLaDA2MoeConfig.from_json(model_dir)
    total, active = config.num_parameters()
    base = hub_id(info.source_dir)
    code = remote_code_origin(model_dir, info)
    from_scratch = info.task == "init" or (info.recorded and not info.init_from)
    facts = {
        "task": info.task,
        "step": info.step,
        "base_model_dir": info.source_dir or info.init_from,
        "trained_from_scratch": from_scratch if (info.recorded or info.task == "init") else None,
        "recipe": info.recipe,
        "data_files": info.data_files,
        "block_length": info.block_length,
        "t2t_trained": info.t2t_trained,
        "lora_merged": info.lora,
        "remote_code": code,
        "latest_evaluation_step": (info.evaluation or {}).get("step"),
    }
    meta: dict[str, Any] = {}
    source_meta = read_card_metadata(info.source_dir) if info.source_dir else {}
    if source_meta.get("license"):  # a fine-tune is under its base model's licence
        meta["license"] = source_meta["license"]
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "finetune"
    meta |= {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["llada2", "block-diffusion", "diffusion-lm", "llada_train"]
        + ([info.task] if info.task else []),
        "llada_train": facts,
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    name = os.path.basename(os.path.abspath(model_dir))
    if name == "hf":  # <run_dir>/checkpoints/step_N/hf: the run's name
        name = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(model_dir))))
    lines = [f"---\n{front}---", ""]
    lines += [f"# LLaDA2-MoE block-diffusion LM: {_stage(info)} ({name})", ""]
    lines += [
        "Written by llada_train at the save of this checkpoint. "
        f"{_count(total)} parameters ({_count(active)} active per token), "
        f"{config.num_hidden_layers} layers, {config.num_experts} experts "
        f"({config.num_experts_per_tok} per token), vocabulary {config.vocab_size}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| Base model | {_base_text(info, base, from_scratch)} |",
        f"| Stage | {_STAGES.get(info.task or '', info.task or 'not recorded')} |",
        f"| Recipe | {f'`+recipe={info.recipe}`' if info.recipe else 'none (defaults)'} |"
        if info.recorded
        else "| Recipe | not recorded |",
        f"| Steps | {_steps_text(info)} |",
        f"| Data | {_files_text(info)} |",
        f"| block_length | {info.block_length if info.block_length else 'not recorded'} |",
        f"| Corruption | {_corruption_text(info)} |",
    ]
    if info.lora:
        lines.append("| LoRA | adapters merged into these weights |")
    if info.command:
        lines += ["", "Command:", "", "```", info.command, "```"]
    lines += ["", *_decoding_section(info), "", *_evaluation_section(info), ""]
    lines += _loading_section(code, info)
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _stage(info: ExportInfo) -> str:
    task = (info.task or "checkpoint").upper() if info.task != "init" else "fresh init"
    return f"{task}, step {info.step}" if info.step is not None else task


def _base_text(info: ExportInfo, base: str | None, from_scratch: bool) -> str:
    if from_scratch:
        seed = f" (seed {info.seed})" if info.seed is not None else ""
        return f"none: trained from scratch{seed}"
    if info.init_from and not info.source_dir:
        return f"`{info.init_from}` (not readable at the save)"
    if info.source_dir:
        hub = f" ([{base}](https://huggingface.co/{base}))" if base else ""
        return f"`{info.source_dir}`{hub}"
    return "not recorded"


def _steps_text(info: ExportInfo) -> str:
    if info.task == "init":
        return "0"
    of = f" of {info.max_steps}" if info.max_steps else ""
    unit = "RL updates" if info.task == "rl" else "optimizer steps"
    return f"{info.step}{of} {unit}" if info.step is not None else "not recorded"


def _files_text(info: ExportInfo) -> str:
    if not info.data_files:
        return "none" if info.task == "init" else "not recorded"
    return ", ".join(f"`{f}`" for f in info.data_files)


def _corruption_text(info: ExportInfo) -> str:
    if info.task == "init":
        return "none (not trained)"
    if info.t2t_trained is True:
        text = "mask + T2T noise: editing (T2T) trained"
    elif info.t2t_trained is False:
        text = "mask only (M2T): T2T editing NOT trained, decode with editing off"
    else:
        text = "T2T training not known (the source was not trained here)"
    c = info.corruption
    if c:
        keys = ("t_min", "t_max", "noise_max", "keep_share", "mtf_fraction")
        text += " (" + ", ".join(f"{k} {c[k]}" for k in keys if k in c) + ")"
    return text


def _decoding_section(info: ExportInfo) -> list[str]:
    g = generation_fields(info)
    blocks = f"blocks of {g['block_length']} tokens" if "block_length" in g else "blocks"
    lines = [
        "## Decoding",
        "",
        f"Joint threshold decoding (M2T mask filling + T2T editing) in {blocks}; "
        "generation_config.json holds the decode settings (custom fields) and these presets:",
        "",
        "| preset | threshold | editing_threshold | max_post_steps |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in g["decode_presets"].items():
        edit = "off" if p["editing_threshold"] is None else p["editing_threshold"]
        lines.append(f"| {name} | {p['threshold']} | {edit} | {p['max_post_steps']} |")
    if "threshold" in g:
        edit = "off" if g.get("editing_threshold") is None else g["editing_threshold"]
        lines += [
            "",
            f"Run's sampler (default of generation_config.json): threshold {g['threshold']}, "
            f"editing_threshold {edit}, max_post_steps {g.get('max_post_steps')}.",
        ]
    if info.t2t_trained is False:
        lines += ["", "This model was not trained on T2T editing: keep editing off."]
    return lines


def _evaluation_section(info: ExportInfo) -> list[str]:
    lines = ["## Evaluation", ""]
    ev = info.evaluation
    if not ev or not ev.get("scores"):
        return lines + [
            "No evaluation of this run yet at this save; this checkpoint's own scores go to "
            f"`../{RESULTS_FILE}` when it is evaluated (`python -m llada_train.eval`)."
        ]
    s = ev.get("sampler") if isinstance(ev.get("sampler"), dict) else {}
    preset = s.get("preset") or "custom"
    edit = "off" if s.get("editing_threshold") is None else s.get("editing_threshold")
    lines += [
        f"Latest evaluation of this run: step {ev['step']} "
        + ("(this checkpoint)" if ev["step"] == info.step else "(an earlier checkpoint)")
        + f", sampler preset `{preset}` (threshold {s.get('threshold')}, editing_threshold "
        f"{edit}, block_length {s.get('block_length')}), limit {ev.get('limit')}, "
        f"TPF {ev.get('tpf')}. This checkpoint's own scores: `../{RESULTS_FILE}`.",
        "",
        "| task | metric | value |",
        "| --- | --- | --- |",
    ]
    for task, metrics in ev["scores"].items():
        for metric, value in (metrics if isinstance(metrics, dict) else {}).items():
            if not metric.endswith("_stderr"):
                shown = f"{value:.4f}" if isinstance(value, float) else value
                lines.append(f"| {task} | {metric} | {shown} |")
    return lines


def _loading_section(code: str, info: ExportInfo) -> list[str]:
    if code == "llada_train":
        which = (
            "The remote code here is llada_train's (`configuration_llada2_moe.py` needs "
            "transformers only; `modeling_llada2_moe.py` wraps llada_train: `pip install "
            "llada_train`). The tensor names and config keys are the official ones, so the "
            "official modeling code of inclusionAI/LLaDA2.1-mini (copy its two .py files over "
            "these) and SGLang's LLaDA2 model load this directory as well."
        )
    else:
        where = f" `{info.source_dir}`" if info.source_dir else ""
        which = (
            f"The remote code here is the source model's{where} (the files its auto_map names), "
            "so this directory loads with the same calls as that model."
        )
    return [
        "## Loading",
        "",
        which,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, dtype="auto")',
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        "",
        "from llada_train.model.io import from_pretrained  # llada_train's own loader",
        "model = from_pretrained(DIR)",
        "```",
        "",
        "Serving: `python -m sglang.launch_server --model-path DIR --dllm-algorithm "
        "JointThreshold`; chat: `python -m llada_train.generate model_dir=DIR`.",
    ]


def init_info(seed: int | None) -> ExportInfo:
    """The `ExportInfo` of a freshly initialised model (`python -m llada_train.model.init`)."""
    return ExportInfo(task="init", step=0, seed=seed, recorded=True)


__all__ = [
    "ExportInfo",
    "describe_run",
    "generation_fields",
    "init_info",
    "latest_evaluation",
    "write_model_card",
]
