"""Run set-up and checkpoint policy, one path for the CPT/SFT loop (train.py) and the RL loop.

Both loops read the same way:

    run = open_run(cfg, job_type, batch)     # run dir (writable), tokenizer + special ids, model
                                             # config (init_from checked), process group,
                                             # precision, the checkpoint to resume from (checked)
    ds_config = run.deepspeed_config(accumulation)
    model = run.build_model(ds_config)       # fresh (seeded) or init_from (model/build.py)
    engine = run.start(model, ds_config, num_optimizer_steps, smoke_prompts)
                                             # DeepSpeed engine, fp32 expert bias, resume
                                             # (engine, expert bias, LR schedule), tracker
    for step in range(run.start_step, cfg.max_steps):
        ...
        run.count_nonfinite(step + 1, is_finite, loss, grad_norm)
        if run.should_log(step + 1): run.tracker.log(metrics, step + 1)
        if run.should_save(step + 1): run.save(step + 1)

Contract (the `checkpoint`, `tracking` and resume options, honoured alike by every loop):
- `tracking.log_every`: metrics every N steps and at the last step.
- `checkpoint.save_every` (and the last step), `keep_last`, `export_hf`, `export_dtype`: an
  atomic, durable save (`checkpoint.save_checkpoint`) whose client state holds the step, the
  non-finite count and the fp32 expert biases (restored on resume); every export holds the
  training facts (`llada_train.json`: block_length, chat_template, task, max_length) and the
  checkpoint what a resume must share with it (data, global batch, seed, model).
- After each save: an in-process lm-eval every `eval_every_saves` saves (`checkpoint.eval`;
  its sampler decodes with the run's `block_length` unless `checkpoint.eval.sampler` sets one),
  and `smoke_prompts` prompts decoded by the shared sampler (`smoke_gen_length` tokens), logged
  as a table and written to `smoke_generation.json` (also on resume when a kill right after the
  save left it out). A failure of either is printed and never stops training.
- Non-finite guard: a loop tells `count_nonfinite` whether each step's update was finite (all
  ranks agree); `max_consecutive_nonfinite` skipped ones in a row stop the run.
- One run per output_dir: rank 0 locks `<output_dir>/run.lock` (`lock.py`) before the run
  writes anything there (Hydra's own `.hydra/` and log file come before the task starts) and
  holds it until `finish` or the end of the process, however it ends; the verdict is
  all-reduced, so a second run on a live run's dir stops at launch on every rank with
  `error: <dir> is in use by pid N on host H since T; ...` and exit status 2.
- The expert bias of every MoE router stays fp32 whatever the weights' dtype: it only selects
  experts, and its updates are far below bf16 resolution.
- Decoding (smoke samples, held-out checks, in-process lm-eval; RL rollouts and held-out
  reward) goes through `run.decoding()`: under ZeRO-3 with the gather `start` resolved
  (`rollout.gather` for RL, `auto` for SFT/CPT: `memory_plan.decode_gather`), printed once.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from llada_train.checkpoint import (
    SMOKE_FILE,
    check_resume_keys,
    load_checkpoint,
    remove_partials,
    resolve_model_dir,
    resolve_resume,
    save_checkpoint,
)
from llada_train.config import checkpoint_eval_node
from llada_train.data.pipeline import HeldoutQuestion, heldout_right
from llada_train.distributed import (
    DecodeDesync,
    DistInfo,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    create_engine,
    deepspeed_config,
    inference_model,
    init_distributed,
    is_partitioned,
    reset_schedule,
    resolve_precision,
)
from llada_train.errors import EXIT_USER_ERROR, check_writable
from llada_train.eval.watch import start_background
from llada_train.lock import RUN_LOCK, DirLock, in_use_message, try_lock_dir
from llada_train.lora import apply_lora, merged_official_state
from llada_train.memory_plan import decode_gather, device_gb
from llada_train.model.build import build_model, resolve_model_config
from llada_train.model.card import remember_hydra_record
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.io import check_checkpoint, load_training_facts
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.sampler import Sampler, sampler_config
from llada_train.tokenizer import SpecialIds, resolve_tokenizer, special_ids
from llada_train.tracking import Tracker

EXPORT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


EVAL_MODES = ("auto", "background", "in_process")


def resolve_eval_mode(checkpoint_cfg, device: torch.device) -> str:
    """The evaluation of saved checkpoints: off (eval_every_saves 0), background or in_process;
    auto is background on CPU and in_process on GPU, whose memory the training job holds.
    Raises ValueError for an unknown checkpoint.eval_mode."""
    mode = checkpoint_cfg.eval_mode
    if mode not in EVAL_MODES:
        raise ValueError(f"checkpoint.eval_mode must be one of {EVAL_MODES}, got {mode!r}")
    if checkpoint_cfg.eval_every_saves <= 0:
        return "off"
    if mode == "auto":
        return "in_process" if device.type == "cuda" else "background"
    return mode


def run_tokenizer(cfg: DictConfig):
    """The run's tokenizer (`tokenizer`: default, a path, or null = the init_from dir's); None
    only when neither names one (a dry run then takes the ids from the model config)."""
    return resolve_tokenizer(cfg.tokenizer, cfg.init_from)


def corruption_trains_t2t(corruption: Any) -> bool:
    """Whether a `corruption` node (conf/corruption/*.yaml) supervises any visible token: T2T
    random-token noise (`noise_max`), keep supervision (`keep_share`) or MTF (`mtf_fraction`).
    All three 0 is the mask-only LLaDA2.0 recipe (M2T only), after which a model's T2T
    proposals are arbitrary (docs/learning.md, sorting frontier)."""
    return corruption.noise_max > 0 or corruption.keep_share > 0 or corruption.mtf_fraction > 0


def t2t_trained(corruption: Any, init_from: str | None) -> bool | None:
    """The `t2t_trained` training fact of a run's exports (llada_train.json): True when this
    run's `corruption` (None for RL, which trains masked positions only) or any stage before it
    (`init_from`'s own fact) supervised visible tokens; False when none did; None (fact not
    written) when unknown, i.e. `init_from` is a model not trained here and this run adds no
    T2T. `sampler_config` warns when a model whose fact is False is decoded with editing on."""
    sources = [] if corruption is None else [corruption_trains_t2t(corruption)]
    if init_from:
        sources.append(load_training_facts(init_from).get("t2t_trained"))
    if True in sources:
        return True
    if not sources or None in sources:
        return None
    return False


@dataclass
class Run:
    """One training run: where it writes, what it trains, and (after `start`) its engine."""

    cfg: DictConfig
    job_type: str  # sft | cpt | rl: the W&B job type and the checkpoint's `task`
    info: DistInfo
    run_dir: str
    tokenizer: Any
    ids: SpecialIds
    model_config: LLaDA2MoeConfig
    precision: str  # bf16 | fp32
    fixed: dict  # what a resumed run must share with its checkpoint (COMPLETE.json "fixed")
    facts: dict  # decode-relevant facts written with every export (llada_train.json)
    resume_path: str | None = None  # the checkpoint to resume from (checked against `fixed`)
    lock: DirLock | None = None  # rank 0: its lock on run_dir (lock.py), held until `finish`
    engine: Any = None
    model: LLaDA2MoeModelLM | None = None  # engine.module
    tracker: Tracker | None = None
    start_step: int = 0
    smoke_prompts: list[list[int]] | None = None  # decoded at every save
    num_nonfinite: int = 0  # steps (SFT/CPT) or updates (RL) skipped as non-finite
    consecutive_nonfinite: int = 0
    gather: str = "whole"  # how decoding gets its weights under ZeRO-3 (resolved in `start`)

    @property
    def use_lora(self) -> bool:
        return bool(self.cfg.lora.enabled)

    @property
    def trains_t2t(self) -> bool:
        """False for an SFT/CPT run whose corruption supervises no visible token (noise_max,
        keep_share and mtf_fraction all 0: the mask-only LLaDA2.0 recipe). Such a model never
        learns what to do at an unmasked position, so its T2T proposals are arbitrary (on the
        sorting task every gold answer shown whole gets edited): the smoke samples, the
        held-out check and the lm-eval at saves then decode with T2T editing off (M2T only),
        whatever the sampler node says. RL runs (no corruption node) decode as configured.
        This looks at this run's corruption alone; the export's `t2t_trained` fact also counts
        the stages before it (`t2t_trained`), so a mask-only SFT from a T2T-trained CPT model
        checks itself M2T only but exports t2t_trained true."""
        c = self.cfg.get("corruption")
        return c is None or corruption_trains_t2t(c)

    @property
    def eval_mode(self) -> str:
        return resolve_eval_mode(self.cfg.checkpoint, self.info.device)

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    def deepspeed_config(self, accumulation: int) -> dict[str, Any]:
        c = self.cfg
        return deepspeed_config(
            c.deepspeed, c.optim, c.micro_batch_size, accumulation, self.info.world_size,
            self.precision,
        )  # fmt: skip

    def build_model(self, ds_config: dict[str, Any]) -> LLaDA2MoeModelLM:
        model = build_model(
            self.model_config, ds_config, init_from=self.cfg.init_from, seed=self.cfg.seed,
            is_main=self.info.is_main, init_jitter=self.cfg.get("init_jitter", 0.0),
        )  # fmt: skip
        model.gradient_checkpointing = self.cfg.activation_checkpointing
        model.attention_backend = self.cfg.attention_backend
        return model

    def start(
        self,
        model: LLaDA2MoeModelLM,
        ds_config: dict[str, Any],
        num_steps: int,
        smoke_prompts: list[list[int]],
    ):
        """DeepSpeed engine over `model` (LR schedule over `num_steps` optimizer steps), fp32
        expert biases, resume (engine, expert biases, the LR of the next update recomputed under
        the current schedule), tracker; a resumed checkpoint that lacks its smoke generation (a
        kill right after the save) gets it. Returns the engine."""
        if self.use_lora:  # adapters on the attention and dense MLPs, base frozen (lora.py)
            model = apply_lora(model, self.cfg.lora)
        self.engine = create_engine(model, ds_config, self.cfg.optim, num_steps)
        self.model = self.engine.module
        self.smoke_prompts = smoke_prompts
        # one choice for every rank: a mixed cluster plans for its smallest GPU
        gpu_gb = all_reduce_min(device_gb(self.cfg.plan)[0], self.info.device)
        self.gather, why = decode_gather(
            self.cfg, self.model_config, self.job_type, self.info.world_size,
            self.info.device.type, gpu_gb,
        )  # fmt: skip
        if is_partitioned(self.model) and self.info.is_main:
            print(f"decoding under ZeRO-3: {self.gather} gather ({why})", flush=True)
        for moe in self.model.moe_layers():  # selection-only bias stays fp32 (module docstring)
            moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()
        if self.resume_path:
            state = load_checkpoint(self.engine, self.resume_path, adapter_only=self.use_lora)
            self.start_step = int(state["step"])
            biases = state.get("expert_bias", [])
            for moe, bias in zip(self.model.moe_layers(), biases, strict=False):
                moe.gate.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
            reset_schedule(self.engine, self.cfg.optim.lr)  # the next update: current schedule
        self.tracker = Tracker(
            self.cfg.tracking, self.run_dir, OmegaConf.to_container(self.cfg, resolve=True),
            self.info.is_main, resume_step=self.start_step if self.resume_path else None,
            job_type=self.job_type,
        )  # fmt: skip
        if self.eval_mode == "background" and self.info.is_main:
            c = self.cfg.checkpoint
            watcher = start_background(
                self.run_dir,
                c.eval,
                self.cfg.tracking,
                every_steps=c.save_every * c.eval_every_saves,
            )
            print(f"evaluating every checkpoint in the background: pid {watcher.pid}, log "
                  f"{os.path.join(self.run_dir, 'eval', 'watcher.log')}", flush=True)  # fmt: skip
        if self.resume_path and not os.path.exists(os.path.join(self.resume_path, SMOKE_FILE)):
            self._write_smoke_generation(self.resume_path, self.start_step)
        return self.engine

    def decoding(self):
        """`decoding(model, gather, engine)` of this run: the context to decode in (a
        collective: every rank enters; under a layerwise gather no other collective may run
        inside it)."""
        return decoding(self.model, self.gather, self.engine)

    def announce(self, what: str) -> None:
        """Print (rank 0) the start-up line: `what` the loop adds, then the run's set-up."""
        c = self.cfg
        if self.info.is_main:
            print(
                f"{self.job_type}: {what}, world {self.info.world_size}, "
                f"ZeRO-{c.deepspeed.stage}, {self.precision}, steps {self.start_step}->"
                f"{c.max_steps}"
                + (f", resumed from {self.resume_path}" if self.resume_path else ""),
                flush=True,
            )

    # ------------------------------------------------------------------ checkpoint policy
    def _due(self, step: int, every: int) -> bool:
        """Whether a periodic action runs after optimizer step `step`: every `every` steps and at
        the last one."""
        return step % every == 0 or step == self.cfg.max_steps

    def should_log(self, step: int) -> bool:
        return self._due(step, self.cfg.tracking.log_every)

    def should_save(self, step: int) -> bool:
        return self._due(step, self.cfg.checkpoint.save_every)

    def should_check_heldout(self, step: int) -> bool:
        every = self.cfg.heldout.every  # 0: off
        return every > 0 and self._due(step, every)

    def save(self, step: int) -> str:
        """Save `step` (module docstring), then its evaluation hooks; returns the path."""
        state = {
            "step": step,
            "nonfinite_steps": self.num_nonfinite,
            "expert_bias": [m.gate.expert_bias.tolist() for m in self.model.moe_layers()],
            "task": self.job_type,
        }
        c = self.cfg.checkpoint
        path = save_checkpoint(
            self.engine, self.ckpt_root, step, state, self.info.is_main, c.keep_last,
            c.export_hf, EXPORT_DTYPES[c.export_dtype], self.tokenizer, self.facts, self.fixed,
            adapter_only=self.use_lora,
            export_state=merged_official_state if self.use_lora else None,
        )  # fmt: skip
        every = c.eval_every_saves
        if self.eval_mode == "in_process" and (step // c.save_every) % every == 0:
            try:
                self._evaluate(path, step)
            except DecodeDesync:  # the ranks are out of step: training cannot go on
                raise
            except Exception as e:  # noqa: BLE001 - evaluation must never kill training
                if self.info.is_main:
                    print(f"[checkpoint {step}] evaluation failed: {type(e).__name__}: {e}")
        self._write_smoke_generation(path, step)
        return path

    def count_nonfinite(self, step: int, is_finite: bool, loss: float, grad_norm: float) -> None:
        """Count a step whose update was skipped as non-finite (all ranks agree on `is_finite`):
        a warning line, and after `max_consecutive_nonfinite` in a row (0 = never) a ValueError
        starting `step N: non-finite` that stops the run. A finite step resets the streak."""
        if is_finite:
            self.consecutive_nonfinite = 0
            return
        self.num_nonfinite += 1
        self.consecutive_nonfinite += 1
        consecutive, limit = self.consecutive_nonfinite, self.cfg.max_consecutive_nonfinite
        if self.info.is_main:
            print(
                f"warning: step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}); the "
                f"update was skipped ({consecutive} in a row)",
                flush=True,
            )
        if limit > 0 and consecutive >= limit:
            self.tracker.finish()
            raise ValueError(
                f"step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}) in "
                f"{consecutive} consecutive steps; their updates were skipped and no checkpoint "
                "holds non-finite weights. Lower optim.lr, check the data, or raise "
                "max_consecutive_nonfinite"
            )

    def _write_smoke_generation(self, path: str, step: int) -> None:
        """Decode the smoke prompts, log them as a table and write `smoke_generation.json` into
        the checkpoint `path`. A failure is printed and never stops training. A collective under
        ZeRO-3: every rank enters."""
        c, is_main, prompts = self.cfg.checkpoint, self.info.is_main, self.smoke_prompts
        if c.smoke_prompts <= 0 or not prompts:
            return
        try:
            texts, stats = self._smoke_generate(prompts[: c.smoke_prompts])
        except DecodeDesync:  # the ranks are out of step: training cannot go on
            raise
        except Exception as e:  # noqa: BLE001 - evaluation must never kill training
            if is_main:
                print(f"[checkpoint {step}] smoke generation failed: {type(e).__name__}: {e}")
            return
        if not is_main:
            return
        rows = [
            [self.tokenizer.decode(p, skip_special_tokens=False), t]
            for p, t in zip(prompts, texts, strict=False)
        ]
        self.tracker.log_table("samples", ["prompt", "completion"], rows, step)
        with open(os.path.join(path, SMOKE_FILE), "w") as f:
            json.dump(
                {"step": step, "samples": rows, "tpf": stats.tpf,
                 "tokens_per_s": stats.tokens_per_s},
                f, indent=2,
            )  # fmt: skip

    def _smoke_generate(self, prompts: list[list[int]], gen_length: int | None = None):
        """Decode `prompts` with the shared sampler (under ZeRO-3 with the run's gather) into
        `gen_length` tokens (default checkpoint.smoke_gen_length); returns (texts, stats)."""
        s_cfg = sampler_config(self.cfg.sampler).replace(
            gen_length=gen_length or self.cfg.checkpoint.smoke_gen_length
        )
        if not self.trains_t2t:
            s_cfg = s_cfg.replace(editing_threshold=None)
        with self.decoding() as whole:
            sampler = Sampler(whole, self.ids.mask_id, self.ids.eos_id, s_cfg, self.info.device)
            out = sampler.generate(prompts)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
        return texts, out.stats

    def heldout_check(self, questions: list[HeldoutQuestion], step: int) -> dict:
        """The share of held-out `questions` the model answers right, decoded by the shared
        sampler with the run's sampler node and heldout.gen_length tokens: a chat's stripped
        completion must equal its gold, an RL record's must earn reward 1 (`heldout_right`).
        Returns {"heldout/exact_match", "heldout/tpf"} (a collective under ZeRO-3: every rank
        enters and decodes the same questions) and prints one line on rank 0. Decodes with
        editing off when the run trains no T2T (`trains_t2t`). Issue 17: a monitor, not an
        evaluation (that is lm-eval's job at the saves)."""
        texts, stats = self._smoke_generate(
            [q.prompt_ids for q in questions], self.cfg.heldout.gen_length
        )
        right = sum(heldout_right(texts, questions))
        figures = {"heldout/exact_match": right / len(questions), "heldout/tpf": stats.tpf}
        if self.info.is_main:
            note = "" if self.trains_t2t else ", editing off: the corruption trains no T2T"
            print(
                f"[step {step}] held-out exact match {right}/{len(questions)} "
                f"(TPF {stats.tpf:.2f}{note})",
                flush=True,
            )
        return figures

    def _evaluate(self, path: str, step: int) -> None:
        """lm-eval of the checkpoint on rank 0 with the run's gather (a collective, so every
        rank enters; layerwise: the other ranks run rank 0's forwards with it); results go next
        to the checkpoint and to the tracker at `step`. Every rank meets at a barrier after the
        decoding block, also when rank 0's evaluation raised (then re-raised there), so the
        ranks enter the next collective together; not after a `DecodeDesync`."""
        from llada_train.eval.evaluate import evaluate_checkpoint

        # decoded with the block length the run trains with, unless checkpoint.eval sets one
        eval_cfg = OmegaConf.merge(
            {"sampler": {"block_length": self.cfg.block_length}},
            checkpoint_eval_node(self.cfg.checkpoint.eval),
        )
        if not self.trains_t2t:  # as the smoke samples and held-out check: M2T only
            eval_cfg.sampler.editing_threshold = None
        failure = None
        try:
            with self.decoding() as whole:
                if self.info.is_main:
                    evaluate_checkpoint(
                        path, eval_cfg, model=whole, tokenizer=self.tokenizer, step=step,
                        tracker=self.tracker,
                    )  # fmt: skip
        except DecodeDesync:  # out of step: a barrier could pair with another collective
            raise
        except Exception as e:  # noqa: BLE001 - raised again below, after the barrier
            failure = e
        barrier()  # pass or fail, the ranks leave together (not inside a layerwise block)
        if failure is not None:
            raise failure

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
        if self.lock is not None:  # otherwise released when the process ends, however it ends
            self.lock.release()
            self.lock = None


@contextlib.contextmanager
def decoding(model: LLaDA2MoeModelLM, gather: str = "whole", engine=None):
    """The model in eval mode for a block of sampler calls, its weights as `gather` says under
    ZeRO-3 (whole | layerwise; a collective: every rank enters, see
    `distributed.inference_model`, which raises ValueError for another value); its train/eval
    mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with inference_model(model, gather, engine) as whole:
            yield whole
    finally:
        model.train(was_training)


IN_USE_ADVICE = "wait for it to end, or choose another output_dir"


def check_run_lock(refusal: str | None, info: DistInfo) -> None:
    """Every rank stops when rank 0 could not lock the run dir (`refusal`: its message): rank 0
    raises the ValueError (one `error:` line, exit 2), the others exit 2 without a word, so no
    rank waits in a collective for one that has left."""
    refused = torch.tensor([float(refusal is not None)], device=info.device)
    if float(all_reduce_sum(refused)) == 0:
        return
    if info.is_main:
        raise ValueError(refusal)
    time.sleep(2.0)  # rank 0 leaves first: torchrun reports its exit, not a terminated rank 0
    raise SystemExit(EXIT_USER_ERROR)


def open_run(cfg: DictConfig, job_type: str, batch: dict[str, Any]) -> Run:
    """Process group, run directory (writable, and locked: one run per output_dir), tokenizer
    and special ids, model config (and init_from's files checked), precision, and the
    checkpoint to resume from: partial saves removed, the latest complete one checked against
    what the run must share with it (data, `batch` (the global batch keys of the loop), seed,
    model; `resume_allow_changes`).

    `init_from` may name a model dir, a checkpoint or a run dir (its latest complete
    checkpoint's export). Raises ValueError when no tokenizer is named and init_from is unset,
    or when `checkpoint.eval` (used when eval_every_saves > 0) holds a bad value, or (on rank
    0; the other ranks exit 2 quietly) when another live process holds the run dir's lock.
    """
    if cfg.checkpoint.eval_every_saves > 0:  # its partial eval config, checked before any work
        from llada_train.eval.config import as_eval_config

        as_eval_config(checkpoint_eval_node(cfg.checkpoint.eval))
        resolve_eval_mode(cfg.checkpoint, torch.device("cpu"))  # checks checkpoint.eval_mode
    if cfg.init_from:
        cfg.init_from = resolve_model_dir(cfg.init_from)
    run_dir = os.path.abspath(cfg.output_dir)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    check_writable(ckpt_root, "checkpoint directory")  # at launch, not at the first save
    is_rank0 = int(os.environ.get("RANK", 0)) == 0  # no process group yet (init_distributed)
    lock = try_lock_dir(run_dir, RUN_LOCK) if is_rank0 else None
    refusal = None  # rank 0's message when another live process holds the lock
    if is_rank0 and lock is None:
        refusal = in_use_message(run_dir, RUN_LOCK, IN_USE_ADVICE)
    tokenizer = run_tokenizer(cfg)
    if tokenizer is None:
        raise ValueError("tokenizer=null needs init_from=DIR holding the tokenizer files")
    info = init_distributed()
    check_run_lock(refusal, info)  # before this run writes anything into run_dir
    remember_hydra_record(run_dir)  # the cards' record, before a refused run can rewrite it
    model_config = resolve_model_config(cfg.init_from, cfg.get("model"), tokenizer)
    if cfg.init_from:
        check_checkpoint(cfg.init_from, model_config)  # whole shards, names and shapes
    fixed = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        **batch,
        "seed": cfg.seed,
        "model": model_config.to_dict(),
    }
    if info.is_main:
        remove_partials(ckpt_root)
    barrier()
    resume_path = resolve_resume(cfg.resume, ckpt_root)
    if resume_path:
        check_resume_keys(resume_path, fixed, cfg.resume_allow_changes)
    facts = {"block_length": cfg.block_length, "chat_template": job_type != "cpt", "task": job_type}
    if "max_length" in cfg.data:
        facts["max_length"] = cfg.data.max_length
    t2t = t2t_trained(cfg.get("corruption"), cfg.init_from)
    if resume_path and load_training_facts(os.path.join(resume_path, "hf")).get("t2t_trained"):
        t2t = True  # the steps before the resume supervised visible tokens
    if t2t is not None:
        facts["t2t_trained"] = t2t
    return Run(
        cfg=cfg,
        job_type=job_type,
        info=info,
        run_dir=run_dir,
        tokenizer=tokenizer,
        ids=special_ids(tokenizer),
        model_config=model_config,
        precision=resolve_precision(cfg.precision, info.device),
        fixed=fixed,
        facts=facts,
        resume_path=resume_path,
        lock=lock,
    )
