"""Typed config schemas of the training entry points, registered with Hydra.

Contract:
- Every entry point composes `conf/<entry>.yaml` over a structured schema in struct mode, so a
  misspelt key fails at launch with Hydra's message naming the key.
- Each component receives only its own sub-config (`cfg.corruption`, `cfg.optim`, ...).
- `+recipe=NAME` selects `recipes/NAME.yaml`: every file there is registered here as an option of
  the `recipe` group in the global package, so recipes are deltas over the defaults.
- String options are enums (`Choice`): a value outside the listed ones fails at composition
  with Hydra's message naming the key and the valid values. The `sampler` node is the typed
  `SamplerConfig` schema; `check_sampler` (called at launch, before any work) also checks its
  ranges (e.g. `sampler.threshold=1.5`). `block_length` has one owner, the top-level key: the
  training configs set `sampler.block_length: ${block_length}`.
- The `model` node is validated by `LLaDA2MoeConfig.from_dict(strict=True)` (unknown keys fail).
"""

from __future__ import annotations

import enum
import glob
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from llada_train import CONF_DIR, RECIPES_DIR, REPO_ROOT
from llada_train.lora import LoraSettings
from llada_train.sampler import SamplerConfig, sampler_config

# ${repo:relative/path} -> an absolute path inside the repository (shipped data, tokenizer).
if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", lambda p: os.path.join(REPO_ROOT, p))


class Choice(str, enum.Enum):
    """A string option: compares, hashes, prints and serialises as its value (the YAML text)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class DataKind(Choice):
    sft = "sft"  # chat `messages`
    cpt = "cpt"  # raw `text`, packed


class OnBadRecord(Choice):
    error = "error"
    skip = "skip"  # skipped records are counted and reported


class Weighting(Choice):
    none = "none"  # the official code
    inv_t = "inv_t"  # ELBO weight 1/t on the M2T terms


class TrackingMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ExportDtype(Choice):
    auto = "auto"  # the training dtype
    float32 = "float32"
    bfloat16 = "bfloat16"


class Precision(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class ObjectiveName(Choice):
    ebpo = "ebpo"
    grpo = "grpo"  # baseline on the same sequence ratio


class LevelWeights(Choice):
    elbo = "elbo"  # w_n = 1 / (N t_n)
    elbo_length = "elbo_length"  # ... / response length


class DataFormat(Choice):  # llada_train/data/formats.py
    auto = "auto"  # per record, from its keys
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"


class Supervise(Choice):
    all = "all"  # every assistant turn is a response
    last = "last"


class Pack(Choice):
    auto = "auto"  # with block-sparse attention, when the cost model says it is cheaper
    always = "always"
    never = "never"


class Gather(Choice):  # llada_train/distributed.py inference_model, docs/scale.md
    auto = "auto"  # whole where the memory plan says it fits, else layerwise; whole on CPU
    whole = "whole"  # the whole model gathered on every rank for a block of decoding
    layerwise = "layerwise"  # ZeRO-3's per-module fetch, every rank in lock-step


class EvalMode(Choice):
    auto = "auto"  # background on CPU, in_process on GPU
    background = "background"
    in_process = "in_process"


@dataclass
class DataConfig:
    kind: DataKind = DataKind.sft
    train_files: list[str] = field(default_factory=list)  # local jsonl / json / parquet
    hub_dataset: str | None = None  # a datasets hub name or a local dataset dir, instead of files
    hub_split: str = "train"
    field: str | None = None  # record field; default `messages` (sft) or `text` (cpt)
    # sft record format: auto | messages | sharegpt | alpaca | prompt_completion (data/formats.py)
    format: DataFormat = DataFormat.auto
    supervise: Supervise = Supervise.all  # sft: all assistant turns are responses, or the last
    pack: Pack = Pack.auto  # sft: several chats per sequence (data/pipeline.py choose_packing)
    max_length: int = 256  # tokens per example (sft) or per packed sequence (cpt)
    pad_supervised: bool = True  # sft: the EOS padding after a response is maskable/supervised
    on_bad_record: OnBadRecord = OnBadRecord.error
    shuffle: bool = True


@dataclass
class CorruptionConfig:
    t_min: float = 0.3  # mask ratio t ~ U[t_min, t_max] (official SFT: 0.3-0.8; CPT: eps-1)
    t_max: float = 0.8
    noise_max: float = 0.2  # T2T: fraction r ~ U[0, noise_max] of visible tokens substituted
    keep_share: float = 0.3  # share of unchanged visible tokens supervised to be kept
    weighting: Weighting = Weighting.none
    mtf_fraction: float = 0.0  # multi-turn forward: share of masks filled by the model's draft
    complementary: bool = False  # pair every example with its complement mask
    pad_weight: float = 1.0  # loss weight of EOS padding after a response (losses.py)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    decay_ratio: float = 1.0  # share of the steps the final cosine spans; < 1: warmup-stable-decay
    decay_end_ratio: float = 1.0  # the cosine ends at this share of the steps; min lr after it
    grad_clip: float = 1.0


@dataclass
class ExpertParallelConfig:
    """DeepSpeed AutoEP (docs/scale.md, 'Expert parallelism'): the router mapping is filled in
    from the model config by `distributed.autoep_block`; other AutoEP keys (e.g. comm_backend)
    go under `deepspeed.overrides.expert_parallel`."""

    autoep_size: int = 0  # 0 = off; N >= 1: routed experts split over groups of N ranks


@dataclass
class DeepSpeedConfig:
    stage: int = 0  # ZeRO stage 0 / 1 / 2 / 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (stage >= 1)
    offload_param: bool = False  # parameters to CPU (stage 3)
    expert_parallel: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed json


@dataclass
class TrackingConfig:
    mode: TrackingMode = TrackingMode.offline  # W&B
    project: str = "llada_train"
    entity: str | None = None
    run_name: str | None = None
    log_every: int = 1


@dataclass
class MoEConfig:
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias += rate * sign(mean - load)
    aux_loss_coef: float = 0.0  # optional load-balance auxiliary loss (0 = off, as official)


DEFAULT_CHECKPOINT_EVAL = {"tasks": ["llada_arith_gen"], "limit": 50}


def checkpoint_eval_node(node: Any) -> dict[str, Any]:
    """`checkpoint.eval` over DEFAULT_CHECKPOINT_EVAL, as a plain dict for `as_eval_config`."""
    given = OmegaConf.to_container(OmegaConf.create(node), resolve=True) if node else {}
    return {**DEFAULT_CHECKPOINT_EVAL, **given}


@dataclass
class CheckpointConfig:
    save_every: int = 50  # optimizer steps between saves (and at the last step)
    keep_last: int = 3
    export_hf: bool = True  # an HF-format (official names) export beside every DeepSpeed save
    export_dtype: ExportDtype = ExportDtype.auto
    smoke_prompts: int = 2  # prompts decoded with the shared sampler at every save (0 = off)
    smoke_gen_length: int = 32
    eval_every_saves: int = 1  # lm-eval of every Nth saved checkpoint (0 = off)
    # background: a watcher process beside the run (never blocks training); in_process: rank 0
    # evaluates the gathered weights at the save (blocks); auto: background on CPU, in_process
    # on GPU (whose memory training holds). `python -m llada_train.eval watch=RUN_DIR` by hand.
    eval_mode: EvalMode = EvalMode.auto
    # partial EvalConfig (llada_train/eval/config.py), e.g. {tasks: [...], limit: 100};
    # null = DEFAULT_CHECKPOINT_EVAL (the shipped generation task, 50 questions)
    eval: Any = None


@dataclass
class HeldoutConfig:
    """A periodic held-out check during CPT/SFT (issue 17): a few questions decoded by the
    shared sampler (the run's `sampler` node) and scored by exact match (chats) or by their
    reward (RL prompt records; data/pipeline.py `load_heldout_questions`), logged with the
    step's metrics as heldout/exact_match (the share right) and heldout/tpf, so a run that is
    not learning shows early."""

    # chat files (the last assistant turn is gold) or RL prompt records, scored by their reward
    files: list[str] = field(default_factory=list)
    every: int = 0  # optimizer steps between checks (and at the last step); 0 = off
    num_questions: int = 32  # the first N records of the files
    gen_length: int = 32  # tokens decoded per question


@dataclass
class PlanConfig:
    """The memory plan that `dry_run=true` prints (llada_train/memory_plan.py, docs/memory.md)."""

    gpu_gb: float | None = None  # GPU memory in GB; None = the CUDA device's, else 80
    num_gpus: int | None = None  # GPUs of the planned run; None = WORLD_SIZE of this process
    # expert-parallel degree to plan for (routed experts split E ways); None = the run's own
    # deepspeed.expert_parallel.autoep_size (1 when AutoEP is off)
    ep_size: int | None = None
    prompt_length: int = 256  # RL: prompt tokens per rollout sequence (+ rollout.gen_length)
    # RL: the conf/model NAME the plan sizes (a dry run before init_from's weights are on disk);
    # null = init_from's config.json. SFT/CPT size their `model` node.
    model: str | None = None


@dataclass
class TrainConfig:
    model: Any = MISSING  # a conf/model node; validated by LLaDA2MoeConfig
    init_from: str | None = None  # HF-format dir (weights + tokenizer); None = fresh init
    init_required: bool = False  # recipes of released models set this: init_from must be given
    tokenizer: str | None = "default"  # default = shipped; a path; None = the init_from dir's
    data: DataConfig = field(default_factory=DataConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # llada_train/lora.py
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # smoke generation at saves
    block_length: int = 32
    micro_batch_size: int = 4
    global_batch_size: int = 8  # = micro_batch_size * accumulation_steps * world_size
    max_steps: int = 100
    seed: int = 0
    # robustness checks only (scripts/robustness.py): every initial weight times
    # (1 + init_jitter * N(0, 1)), a float-rounding-sized perturbation; 0 = off
    init_jitter: float = 0.0
    precision: Precision = Precision.auto
    activation_checkpointing: bool = False
    attention_backend: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest complete checkpoint in output_dir) | none | a path
    resume_allow_changes: bool = False  # resume although data/global batch/seed/model changed
    max_consecutive_nonfinite: int = 3  # stop after this many non-finite steps in a row (0=never)
    dry_run: bool = False  # build on the meta device, print sizes and DeepSpeed config, exit
    plan: PlanConfig = field(default_factory=PlanConfig)  # the memory plan of dry_run
    progress: bool = True  # tqdm progress bar on rank 0


# ---------------------------------------------------------------------------- RL (EBPO)
@dataclass
class RLDataConfig:
    train_files: list[str] = field(default_factory=list)  # jsonl records {prompt, answer|tests}
    eval_files: list[str] = field(default_factory=list)  # held-out prompts for the reward curve
    prompt_field: str = "prompt"
    reward: str | None = None  # reward name for every record; None = each record's "reward"
    system: str | None = None  # optional system message of the chat template
    num_eval_prompts: int = 64


@dataclass
class RolloutConfig:
    group_size: int = 8  # G completions per prompt, all on one rank
    prompts_per_step: int = 8  # global prompts per rollout batch
    gen_length: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    dual_mode_fraction: float = 0.5  # share of groups decoded M2T+T2T; the rest M2T only
    reward_workers: int = 8
    # DAPO dynamic sampling (rl/loop.py collect_rollouts): up to this many rounds of fresh
    # prompts per rollout batch, each rank keeping groups with reward variance until its
    # prompts_per_step / W of them fill its batch; 1 = off (every sampled group is trained on)
    max_rounds: int = 1
    # Under ZeRO-3, how rollouts, the held-out reward, smoke samples and in-process lm-eval get
    # their weights: whole (gathered on every rank), layerwise (per-module fetch in lock-step),
    # auto (whole where the memory plan says it fits, else layerwise; whole on CPU). No effect
    # below ZeRO-3, where the weights are resident. docs/scale.md
    gather: Gather = Gather.auto


@dataclass
class ObjectiveConfig:
    """The `conf` group (conf/rl/*.yaml): `python -m llada_train.rl conf=ebpo`."""

    name: ObjectiveName = ObjectiveName.ebpo
    num_levels: int = 2  # N noise levels of the block-level ELBO
    level_weights: LevelWeights = LevelWeights.elbo
    stratified: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    scale_std: bool = True  # group advantages divided by the group's std
    kl_coef: float = 0.0  # k3 KL to the frozen initial model (0 = off, no reference kept)
    updates_per_batch: int = 2  # optimizer steps per rollout batch


@dataclass
class RLConfig:
    # an HF-format SFT checkpoint (weights + tokenizer); null only in a recipe of a released
    # model (recipes/rl/flash.yaml), which a run must be given and a dry run does not need
    init_from: str | None = MISSING
    tokenizer: str | None = None  # None = the tokenizer inside init_from
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    conf: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)  # llada_train/lora.py
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # rollout + held-out base
    block_length: int | None = None  # null = init_from's trained block length (else 32)
    micro_batch_size: int = 8  # sequences per forward in the ELBO passes
    max_steps: int = 20  # rollout batches
    eval_every: int = 5  # held-out reward every N rollout batches (and at the start and end)
    seed: int = 0
    precision: Precision = Precision.auto
    activation_checkpointing: bool = False
    attention_backend: str = "auto"  # auto (flex on CUDA, sdpa elsewhere) | sdpa | flex
    output_dir: str = "runs/rl"
    resume: str = "auto"
    resume_allow_changes: bool = False  # resume although data/batch/seed/model changed
    max_consecutive_nonfinite: int = 3  # stop after this many non-finite updates in a row
    progress: bool = True
    dry_run: bool = False  # print sizes, the DeepSpeed config and the memory plan, exit
    plan: PlanConfig = field(default_factory=PlanConfig)  # memory plan (llada_train.memory_plan)


# ---------------------------------------------------------------------------- small commands
class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class ModelDtype(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class InitDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class GenerateConfig:
    """`python -m llada_train.generate` (conf/generate.yaml)."""

    model_dir: str = (
        MISSING  # an HF-format LLaDA2.x directory (config.json, safetensors, tokenizer)
    )
    tokenizer: str | None = None  # None = the tokenizer files inside model_dir
    prompt: str = "What is 123 + 456?"
    prompts: list[str] = field(default_factory=list)  # decoded as one batch (overrides prompt)
    system: str | None = None  # optional system message
    chat_template: bool | None = None  # null = as the model was trained; false = raw text
    stream: bool = True  # print each finished block as it is decided (single prompt only)
    device: Device = Device.auto
    dtype: ModelDtype = ModelDtype.auto
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class InitConfig:
    """`python -m llada_train.model.init` (conf/init.yaml)."""

    model: Any = MISSING  # a conf/model node; validated by LLaDA2MoeConfig
    out: str = MISSING  # output directory
    tokenizer: str | None = "default"  # default = shipped; a path; None = ids from the model node
    seed: int = 0
    dtype: InitDtype = InitDtype.float32  # dtype of the written weights
    max_shard_gb: float = 2.0


def register_schemas() -> None:
    """Store every command's schema in Hydra's ConfigStore (`<command>_schema`)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="rl_schema", node=RLConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="init_schema", node=InitConfig)


def check_run(cfg: Any) -> SamplerConfig:
    """The launch checks every training loop (SFT, CPT, RL) shares, before any work: attention
    backend, `deepspeed.*`, `lora.*`, `tracking.log_every` and `checkpoint.save_every`, the
    schedule ratios of `optim.*`, and the sampler
    (`check_sampler`, returned). ValueError naming the key to change."""
    from llada_train.distributed import check_deepspeed, check_expert_parallel
    from llada_train.lora import check_lora
    from llada_train.model.attention import BACKENDS

    if cfg.attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend={cfg.attention_backend!r}: choose one of {BACKENDS}")
    check_deepspeed(cfg.deepspeed)
    check_expert_parallel(cfg)
    check_lora(cfg.lora, cfg.deepspeed.stage)
    for key in ("tracking.log_every", "checkpoint.save_every"):  # Run._due divides by them
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ValueError(
                f"{key}={value} must be >= 1 (optimizer steps between them; the last step "
                "always logs and saves)"
            )
    o = cfg.optim
    for key in ("warmup_ratio", "min_lr_ratio", "decay_ratio", "decay_end_ratio"):
        if not 0.0 <= o[key] <= 1.0:
            raise ValueError(f"optim.{key}={o[key]} must lie in [0, 1]")
    if o.decay_end_ratio < o.warmup_ratio:
        raise ValueError(
            f"optim.decay_end_ratio={o.decay_end_ratio} ends the decay inside the warmup "
            f"(optim.warmup_ratio={o.warmup_ratio}); raise it"
        )
    return check_sampler(cfg)


def check_sampler(cfg: Any) -> SamplerConfig:
    """The run's sampler settings, validated before any work (ValueError naming the key); in a
    training config `sampler.block_length` must equal `block_length` (its one owner)."""
    s_cfg = sampler_config(cfg.sampler)
    if "block_length" in cfg and s_cfg.block_length != cfg.block_length:
        raise ValueError(
            f"sampler.block_length={s_cfg.block_length} differs from block_length="
            f"{cfg.block_length}: a run decodes with the block length it trains; set block_length "
            "only (sampler.block_length follows it)"
        )
    return s_cfg


def register_configs(entry: str = "train") -> None:
    """Register the schemas and the recipes of an entry point.

    `recipes/*.yaml` are deltas of the pre-training entry points (sft, cpt); `recipes/<entry>/`
    holds entry-specific recipes: for `cpt`, a file there is merged over the shared recipe of the
    same name (CPT windows are longer than SFT chats, so the tiny CPT run takes smaller batches);
    the RL entry point reads `recipes/rl/*.yaml` only (its schema differs) and the `conf` group
    from `conf/rl/`.
    """
    register_schemas()
    cs = ConfigStore.instance()
    nodes = {}
    folders = [os.path.join(RECIPES_DIR, entry)] if entry == "rl" else [RECIPES_DIR]
    if entry not in ("rl", "train"):
        folders.append(os.path.join(RECIPES_DIR, entry))
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
            name = os.path.splitext(os.path.basename(path))[0]
            node = OmegaConf.load(path)
            nodes[name] = OmegaConf.merge(nodes[name], node) if name in nodes else node
    for name, node in nodes.items():
        cs.store(group="recipe", name=name, node=node, package="_global_")
    if entry == "rl":
        for path in sorted(glob.glob(os.path.join(CONF_DIR, "rl", "*.yaml"))):
            name = os.path.splitext(os.path.basename(path))[0]
            cs.store(group="conf", name=name, node=OmegaConf.load(path), package="conf")
