"""The CPT/SFT training loop: corruption (M2T + T2T), block-diffusion loss, DeepSpeed ZeRO.

One loop for `python -m llada_train.cpt|sft` and for `torchrun`; it reads top to bottom:
    set-up (process group, tokenizer, model, data, engine, resume)
    for each optimizer step:
        corrupt this rank's micro-batches from per-example seeds (seed, step, 0, global index)
        all-reduce the number of supervised tokens of the whole step
        forward/backward each micro-batch with loss = local_sum * W * A / global_count
        DeepSpeed steps the optimizer at the accumulation boundary (clip, AdamW, LR schedule)
        aux-loss-free expert-bias update from the step's all-reduced expert load
        log; save (atomic) + HF export + smoke generation through the shared sampler
The corruption seeds use the example's index inside the global batch (rank slot fixed to 0), so
the noise of an example does not depend on how many processes share the batch: 2 processes
reproduce 1 process, and a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from llada_train.checkpoint import (
    SMOKE_FILE,
    check_resume_keys,
    fault_point,
    load_checkpoint,
    remove_partials,
    resolve_resume,
    save_checkpoint,
)
from llada_train.config import checkpoint_eval_node
from llada_train.corruption import (
    Corruption,
    apply_model_draft,
    corrupt,
    example_seed,
    with_complements,
)
from llada_train.data.pipeline import (
    GlobalBatches,
    choose_packing,
    load_cpt_examples,
    load_sft_examples,
)
from llada_train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    create_engine,
    deepspeed_config,
    inference_model,
    init_distributed,
    layerwise_gather,
    reset_schedule,
    resolve_precision,
    world_size_from_env,
)
from llada_train.errors import check_known_keys, check_writable
from llada_train.eval.watch import start_background
from llada_train.lora import (
    apply_lora,
    check_lora,
    lora_parameter_count,
    merged_official_state,
    trainable_parameters,
)
from llada_train.losses import (
    diffusion_loss,
    expert_bias_update,
    load_balance_aux_loss,
    loss_metrics,
    micro_batch_loss,
)
from llada_train.masks import training_inputs
from llada_train.model.attention import BACKENDS, resolve_backend
from llada_train.model.config import LLaDA2MoeConfig
from llada_train.model.init import model_config_from_node
from llada_train.model.init import resolve_tokenizer as resolve_tokenizer_spec
from llada_train.model.io import check_checkpoint, load_official_weights
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.tokenizer import SpecialIds, load_tokenizer, special_ids
from llada_train.tracking import Tracker

TASKS = ("sft", "cpt")


@dataclass
class StepInputs:
    x0: torch.Tensor  # (B, L)
    doc_ids: torch.Tensor | None  # (B, L)
    c: Corruption


# ---------------------------------------------------------------------------- set-up helpers
def resolve_model_config(cfg: DictConfig, tokenizer) -> LLaDA2MoeConfig:
    """The model config: init_from's config.json, else the `model` node (+ tokenizer ids)."""
    if cfg.init_from:
        return LLaDA2MoeConfig.from_json(cfg.init_from)
    return model_config_from_node(cfg.model, tokenizer)


def resolve_tokenizer(cfg: DictConfig):
    spec = cfg.tokenizer
    if spec is None:
        if not cfg.init_from:
            if cfg.dry_run:
                return None
            raise ValueError("tokenizer=null needs init_from=DIR holding the tokenizer files")
        return load_tokenizer(cfg.init_from)
    return resolve_tokenizer_spec(spec)


def build_model(cfg: DictConfig, config: LLaDA2MoeConfig, ds_config: dict, info: DistInfo):
    """Fresh (seeded, identical on every rank) or loaded from init_from. With ZeRO-3 and
    init_from, parameters are created partitioned (zero.Init) and filled from the checkpoint
    one decoder layer at a time (rank 0 reads, the others receive their partitions; buffers
    are broadcast from rank 0 afterwards)."""
    if cfg.init_from and cfg.deepspeed.stage == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LLaDA2MoeModelLM(config)
        gather = layerwise_gather(model, modifier_rank=0)
        load_official_weights(model, cfg.init_from, gather=gather, write=info.is_main)
        broadcast_buffers(model)
        return model
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        with torch.device("meta"):
            model = LLaDA2MoeModelLM(config)
        model = model.to_empty(device="cpu")
        load_official_weights(model, cfg.init_from)
        return model
    return LLaDA2MoeModelLM(config)


def check_config(cfg: DictConfig, task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}")
    if cfg.data.kind != task:
        raise ValueError(f"data.kind={cfg.data.kind!r} but this is the {task} entry point")
    if cfg.init_required and not cfg.init_from and not cfg.dry_run:
        raise ValueError(
            "this recipe fine-tunes a released model: pass init_from=/path/to/checkpoint_dir "
            "(an HF-format LLaDA2.x directory with config.json, safetensors and tokenizer)"
        )
    if cfg.data.on_bad_record not in ("error", "skip"):
        raise ValueError(f"data.on_bad_record={cfg.data.on_bad_record!r}: choose error or skip")
    if cfg.max_steps <= 0 or cfg.micro_batch_size <= 0 or cfg.block_length <= 0:
        raise ValueError("max_steps, micro_batch_size and block_length must be positive")
    if cfg.attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend={cfg.attention_backend!r}: choose one of {BACKENDS}")
    if cfg.data.max_length % cfg.block_length:
        fit = max(cfg.block_length, cfg.data.max_length // cfg.block_length * cfg.block_length)
        raise ValueError(
            f"data.max_length={cfg.data.max_length} is not a multiple of block_length="
            f"{cfg.block_length}: examples are padded (SFT) or cut (CPT) to whole blocks, so they "
            f"would exceed it; set data.max_length={fit} or another multiple"
        )
    check_lora(cfg.lora, cfg.deepspeed.stage)


def dry_run(cfg: DictConfig, task: str) -> None:
    """Build on the meta device, print parameter counts and the DeepSpeed config, exit."""
    tokenizer = resolve_tokenizer(cfg)
    config = resolve_model_config(cfg, tokenizer)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    counted = sum(p.numel() for p in model.parameters())
    total, active = config.num_parameters()
    assert counted == total, (counted, total)
    world = world_size_from_env()
    accumulation = max(1, cfg.global_batch_size // (cfg.micro_batch_size * world))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = deepspeed_config(
        cfg.deepspeed, cfg.optim, cfg.micro_batch_size, accumulation, world,
        resolve_precision(cfg.precision, device),
    )  # fmt: skip
    print(f"[dry run] {task}: model built on the meta device (no weights allocated)")
    print(f"total parameters:  {total:,} ({total / 1e9:.2f}B)")
    print(f"active per token:  {active:,} ({active / 1e9:.2f}B)")
    k, e = config.num_experts_per_tok, config.num_experts
    print(f"layers {config.num_hidden_layers}, experts {e} top-{k}")
    # Model states per replica in GB, before ZeRO partitioning and without activations: bf16
    # weights (2 B) + bf16 grads (2 B) + fp32 master weights and Adam moments (12 B) per
    # trained parameter; frozen (LoRA base) parameters hold only their bf16 weights.
    trained = lora_parameter_count(config, cfg.lora) if cfg.lora.enabled else total
    states = (2 * total + 14 * trained) / 1e9
    print(f"model states (bf16 training, before ZeRO partitioning, no activations): "
          f"{states:.1f} GB (full fine-tuning: {16 * total / 1e9:.1f} GB)")  # fmt: skip
    if cfg.lora.enabled:
        n = lora_parameter_count(config, cfg.lora)
        print(
            f"LoRA r={cfg.lora.r} on {list(cfg.lora.target_modules)}: {n:,} trainable "
            f"({n / total:.3%} of the model; routed experts, router, embeddings frozen)"
        )
    print("resolved DeepSpeed config:")
    print(json.dumps(ds, indent=2))


# ---------------------------------------------------------------------------- step pieces
def corrupt_micro_batch(
    batch, cfg: DictConfig, step: int, ids: SpecialIds, vocab_size: int, device
) -> tuple[StepInputs, list[int]]:
    """Corrupt one micro-batch; returns the inputs and the per-row seeds (for MTF drafts)."""
    c_cfg = cfg.corruption
    x0, maskable = batch.x0.to(device), batch.maskable.to(device)
    doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
    seeds = [example_seed(cfg.seed, step, 0, i) for i in batch.example_index]
    kwargs = dict(
        mask_id=ids.mask_id, t_min=c_cfg.t_min, t_max=c_cfg.t_max, noise_max=c_cfg.noise_max,
        keep_share=c_cfg.keep_share, vocab_size=vocab_size, special_ids=ids.all_special,
    )  # fmt: skip
    if c_cfg.complementary:
        c = with_complements(x0, maskable, seeds, **kwargs)
        x0 = torch.cat((x0, x0))
        doc_ids = torch.cat((doc_ids, doc_ids)) if doc_ids is not None else None
        seeds = seeds + [s ^ 0x5DEECE66D for s in seeds]  # partner rows draw their own drafts
    else:
        c = corrupt(x0, maskable, seeds, **kwargs)
    return StepInputs(x0, doc_ids, c), seeds


def model_forward(model_or_engine, xt, x0, doc_ids, block_length: int) -> torch.Tensor:
    input_ids, mask, positions, logits_slice = training_inputs(xt, x0, block_length, doc_ids)
    return model_or_engine(
        input_ids, attention_mask=mask, position_ids=positions, logits_slice=logits_slice
    )


def moe_aux_loss(model: LLaDA2MoeModelLM) -> torch.Tensor:
    losses = []
    for moe in model.moe_layers():
        if moe.last_routing is not None:
            scores, topk_idx = moe.last_routing
            losses.append(load_balance_aux_loss(scores, topk_idx, moe.num_experts))
    return torch.stack(losses).mean() if losses else torch.zeros(())


@torch.no_grad()
def update_expert_bias(model: LLaDA2MoeModelLM, loads: torch.Tensor, rate: float) -> None:
    for moe, load in zip(model.moe_layers(), loads, strict=True):
        moe.gate.expert_bias.copy_(expert_bias_update(moe.gate.expert_bias, load, rate))


def smoke_generate(
    model, tokenizer, ids: SpecialIds, cfg: DictConfig, info: DistInfo, eval_prompts
):
    """Decode a few prompts with the shared sampler (weights gathered once under ZeRO-3)."""
    from llada_train.generate import sampler_config
    from llada_train.sampler import Sampler, SamplerConfig

    n = cfg.checkpoint.smoke_prompts
    if n <= 0 or not eval_prompts:
        return None
    s_cfg = sampler_config(cfg.sampler) if cfg.sampler else SamplerConfig()
    s_cfg = s_cfg.replace(gen_length=cfg.checkpoint.smoke_gen_length, block_length=cfg.block_length)
    was_training = model.training
    model.eval()
    try:
        with inference_model(model) as whole:
            out = Sampler(whole, ids.mask_id, ids.eos_id, s_cfg, device=info.device).generate(
                eval_prompts[:n]
            )
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    return texts, out.stats


def smoke_prompts(tokenizer, task: str, examples) -> list[list[int]]:
    """Prompts for the per-checkpoint generation: SFT prompts of the data, or CPT prefixes."""
    prompts = []
    for e in examples[:8]:
        if task == "sft":
            n = e.maskable.index(True)
            prompts.append(e.input_ids[:n])
        else:
            prompts.append(e.input_ids[:16])
    return prompts


# ---------------------------------------------------------------------------- the loop
def train(cfg: DictConfig, task: str) -> str:
    """Run CPT or SFT as configured; returns the output directory. Bad input (config keys and
    values, data, init_from files, an unwritable output_dir) fails with a ValueError before the
    model is built."""
    check_known_keys(cfg)
    check_config(cfg, task)
    if cfg.dry_run:
        dry_run(cfg, task)
        return cfg.output_dir
    run_dir = os.path.abspath(cfg.output_dir)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    check_writable(ckpt_root, "checkpoint directory")  # at launch, not at the first save
    info = init_distributed()
    tokenizer = resolve_tokenizer(cfg)
    ids = special_ids(tokenizer)
    config = resolve_model_config(cfg, tokenizer)
    if cfg.init_from:
        check_checkpoint(cfg.init_from, config)  # whole shards, names and shapes
    precision = resolve_precision(cfg.precision, info.device)
    fixed = {  # what a resumed run must share with its checkpoint (COMPLETE.json "fixed")
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "global_batch_size": cfg.global_batch_size,
        "seed": cfg.seed,
        "model": config.to_dict(),
    }
    if info.is_main:
        remove_partials(ckpt_root)
    barrier()
    resume_path = resolve_resume(cfg.resume, ckpt_root)
    if resume_path:
        check_resume_keys(resume_path, fixed, cfg.resume_allow_changes)

    packing: dict[str, float] = {}
    if task == "sft":
        chats, skipped = load_sft_examples(cfg.data, tokenizer, ids, cfg.block_length)
        examples, packing = choose_packing(
            chats, cfg.data.pack, cfg.data.max_length, cfg.block_length,
            cfg.global_batch_size, cfg.micro_batch_size, cfg.seed,
            block_sparse=resolve_backend(cfg.attention_backend, info.device) == "flex",
        )  # fmt: skip
    else:
        examples, skipped = load_cpt_examples(cfg.data, tokenizer, ids)
        chats = examples
    pad_maskable = cfg.data.pad_supervised if task == "sft" else True
    batches = GlobalBatches(
        examples, cfg.global_batch_size, cfg.micro_batch_size, info.rank, info.world_size,
        cfg.seed, cfg.data.shuffle, ids.eos_id, pad_maskable,
    )  # fmt: skip
    accumulation = batches.accumulation_steps
    ds_config = deepspeed_config(
        cfg.deepspeed, cfg.optim, cfg.micro_batch_size, accumulation, info.world_size, precision
    )
    model = build_model(cfg, config, ds_config, info)
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.attention_backend = cfg.attention_backend
    use_lora = cfg.lora.enabled
    if use_lora:  # adapters on the attention and dense MLPs, base frozen (llada_train/lora.py)
        model = apply_lora(model, cfg.lora)
    engine = create_engine(model, ds_config, cfg.optim, cfg.max_steps)
    model = engine.module
    for moe in model.moe_layers():  # selection-only bias stays fp32 whatever the weights' dtype
        moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()

    start_step = 0
    if resume_path:
        state = load_checkpoint(engine, resume_path, adapter_only=use_lora)
        start_step = int(state["step"])
        for moe, bias in zip(model.moe_layers(), state.get("expert_bias", []), strict=False):
            moe.gate.expert_bias.copy_(torch.tensor(bias, dtype=torch.float32))
        reset_schedule(engine, cfg.optim.lr)  # the next update follows the current schedule
    tracker = Tracker(
        cfg.tracking, run_dir, OmegaConf.to_container(cfg, resolve=True), info.is_main,
        resume_step=start_step if resume_path else None, job_type=task,
    )  # fmt: skip
    if info.is_main:
        total, active = config.num_parameters()
        print(
            f"{task}: {len(examples)} examples ({skipped} bad records skipped), "
            f"{total / 1e6:.2f}M params ({active / 1e6:.2f}M active, "
            f"{trainable_parameters(model) / 1e6:.3f}M trained{' by LoRA' if use_lora else ''}), "
            f"world {info.world_size}, "
            f"accumulation {accumulation}, ZeRO-{cfg.deepspeed.stage}, {precision}, "
            f"steps {start_step}->{cfg.max_steps}"
            + (f", resumed from {resume_path}" if resume_path else ""),
            flush=True,
        )
        if packing:
            print(
                f"data.pack={cfg.data.pack}: "
                + (
                    f"{len(chats)} chats packed into {len(examples)} sequences "
                    f"({packing['chats_per_sequence']:.2f} per sequence)"
                    if packing["packed"]
                    else "not packed"
                )
                + (
                    f"; cost model {packing['forward_tokens_per_chat_plain']:.0f} forward tokens "
                    f"per chat unpacked vs {packing['forward_tokens_per_chat_packed']:.0f} packed"
                    if "chats_per_sequence" in packing
                    else ""
                ),
                flush=True,
            )
    prompts = smoke_prompts(tokenizer, task, chats)
    eval_mode = resolve_eval_mode(cfg.checkpoint, info.device)
    if eval_mode == "background" and info.is_main:
        watcher = start_background(
            run_dir, cfg.checkpoint.eval, cfg.tracking,
            every_steps=cfg.checkpoint.save_every * cfg.checkpoint.eval_every_saves,
        )  # fmt: skip
        print(f"evaluating every checkpoint in the background: pid {watcher.pid}, log "
              f"{os.path.join(run_dir, 'eval', 'watcher.log')}", flush=True)  # fmt: skip
    export_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        cfg.checkpoint.export_dtype
    ]
    moe_layers = model.moe_layers()
    facts = {  # written with every export, read back by generate, eval and RL
        "block_length": cfg.block_length, "chat_template": task == "sft", "task": task,
        "max_length": cfg.data.max_length,
    }  # fmt: skip
    if resume_path and not os.path.exists(os.path.join(resume_path, SMOKE_FILE)):
        write_smoke_generation(  # a kill right after the rename left it out
            resume_path, start_step, model, tokenizer, ids, cfg, info, prompts, tracker
        )
    bar = tqdm(
        total=cfg.max_steps, initial=start_step, desc=task, dynamic_ncols=True,
        disable=not (info.is_main and cfg.progress),
    )  # fmt: skip
    model.train()
    num_nonfinite = consecutive_nonfinite = 0
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr_applied = engine.get_lr()[0]  # the lr of this step's update (logged `lr` is the next)
        micro = []
        for batch in batches.micro_batches(step):
            inputs, seeds = corrupt_micro_batch(
                batch, cfg, step, ids, config.vocab_size, info.device
            )
            if cfg.corruption.mtf_fraction > 0:  # multi-turn forward: repair the model's own draft
                with torch.no_grad():
                    draft = model_forward(
                        engine, inputs.c.xt, inputs.x0, inputs.doc_ids, cfg.block_length
                    )
                inputs.c = apply_model_draft(
                    inputs.c, inputs.x0, draft, cfg.corruption.mtf_fraction, seeds,
                    mask_id=ids.mask_id, special_ids=ids.all_special,
                )  # fmt: skip
            micro.append(inputs)
        global_count = all_reduce_sum(
            torch.stack([m.c.supervised.sum() for m in micro]).sum().double().to(info.device)
        )
        stats = torch.zeros(12, dtype=torch.float64, device=info.device)
        loads = torch.zeros(len(moe_layers), config.num_experts, device=info.device)
        num_tokens, own_norm = 0, None
        for inputs in micro:
            logits = model_forward(engine, inputs.c.xt, inputs.x0, inputs.doc_ids, cfg.block_length)
            terms = diffusion_loss(logits, inputs.x0, inputs.c, cfg.corruption.weighting)
            loss = micro_batch_loss(terms.total_sum, global_count, info.world_size, accumulation)
            if cfg.moe.aux_loss_coef > 0:
                loss = loss + cfg.moe.aux_loss_coef * moe_aux_loss(model)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and cfg.deepspeed.stage == 0:
                # ZeRO-0 in fp32 does not record the norm; grads are already averaged here
                own_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            engine.step()
            stats += terms.stats().to(stats.device)
            for k, moe in enumerate(moe_layers):
                loads[k] += moe.last_expert_load.float()
            num_tokens += inputs.x0.numel()
        all_reduce_sum(stats)
        all_reduce_sum(loads)
        metrics = loss_metrics(stats)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None or cfg.deepspeed.stage == 0:
            grad_norm = own_norm
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # Non-finite guard: every rank sees the same all-reduced loss and the engine's global
        # decision to skip (ZeRO's overflow check, our ZeRO-0 guard), so all ranks agree.
        is_finite = (
            engine.was_step_applied()
            and math.isfinite(metrics["loss/total"])
            and math.isfinite(grad_norm)
        )
        if is_finite:
            consecutive_nonfinite = 0
            if cfg.moe.bias_update_rate > 0 and moe_layers:
                update_expert_bias(model, loads, cfg.moe.bias_update_rate)
        else:  # no parameter update was applied (skipped step) and no expert-bias update
            num_nonfinite += 1
            consecutive_nonfinite += 1
        elapsed = time.perf_counter() - t0
        mean_load = loads.mean(-1, keepdim=True).clamp_min(1e-9)
        metrics.update(
            {
                "lr": engine.get_lr()[0],
                "lr/applied": lr_applied,
                "nonfinite/steps": num_nonfinite,
                "grad_norm": grad_norm,
                "tokens_per_s": num_tokens * info.world_size / elapsed,
                "step_time_s": elapsed,
                "epoch": batches.epoch(step + 1),
            }
        )
        peak = torch.tensor(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=info.device
        )  # GiB (ru_maxrss is in KiB on Linux)
        metrics["memory/peak_rss_gib_rank0"] = float(peak)
        if info.device.type == "cuda":
            metrics["memory/peak_gpu_gib_rank0"] = torch.cuda.max_memory_allocated() / 2**30
        if moe_layers:
            metrics["moe/max_load_ratio"] = float((loads / mean_load).max(-1).values.mean())
            metrics["moe/bias_abs_mean"] = float(
                torch.stack([m.gate.expert_bias.abs().mean() for m in moe_layers]).mean()
            )
        if (step + 1) % cfg.tracking.log_every == 0 or step + 1 == cfg.max_steps:
            tracker.log(metrics, step=step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", acc=f"{metrics['acc/total']:.2f}")
        if not is_finite:
            stop_on_nonfinite(step + 1, metrics["loss/total"], grad_norm, consecutive_nonfinite,
                              cfg.max_consecutive_nonfinite, info, tracker)  # fmt: skip

        if (step + 1) % cfg.checkpoint.save_every == 0 or step + 1 == cfg.max_steps:
            client_state = {
                "step": step + 1,
                "nonfinite_steps": num_nonfinite,
                "expert_bias": [m.gate.expert_bias.tolist() for m in moe_layers],
                "task": task,
            }
            path = save_checkpoint(
                engine, ckpt_root, step + 1, client_state, info.is_main, cfg.checkpoint.keep_last,
                cfg.checkpoint.export_hf, export_dtype, tokenizer, facts, fixed,
                adapter_only=use_lora,
                export_state=merged_official_state if use_lora else None,
            )  # fmt: skip
            on_checkpoint(path, step + 1, model, tokenizer, ids, cfg, info, prompts, tracker)
        if info.is_main:
            fault_point("kill_after_step", step + 1)
    bar.close()
    tracker.finish()
    return run_dir


def stop_on_nonfinite(
    step: int, loss: float, grad_norm: float, consecutive: int, limit: int, info, tracker
) -> None:
    """Report a non-finite step (no update was applied); after `limit` consecutive ones
    (0 = never) stop the run with a ValueError starting `step N: non-finite`."""
    if info.is_main:
        print(
            f"warning: step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}); the "
            f"update was skipped ({consecutive} in a row)",
            flush=True,
        )
    if limit > 0 and consecutive >= limit:
        tracker.finish()
        raise ValueError(
            f"step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}) in {consecutive} "
            "consecutive steps; their updates were skipped and no checkpoint holds non-finite "
            "weights. Lower optim.lr, check the data, or raise max_consecutive_nonfinite"
        )


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


def evaluate_in_process(path, step, model, tokenizer, cfg, info, tracker) -> None:
    """lm-eval of the checkpoint on rank 0 with the weights gathered once (a collective, so
    every rank enters); results go next to the checkpoint and to the tracker at `step`."""
    from llada_train.eval.evaluate import evaluate_checkpoint

    was_training = model.training
    model.eval()
    try:
        with inference_model(model) as whole:
            if info.is_main:
                node = checkpoint_eval_node(cfg.checkpoint.eval)
                evaluate_checkpoint(path, node, model=whole, tokenizer=tokenizer,
                                    step=step, tracker=tracker)  # fmt: skip
            barrier()
    finally:
        model.train(was_training)


def on_checkpoint(path, step, model, tokenizer, ids, cfg, info, prompts, tracker) -> None:
    """The evaluation hook of a saved checkpoint: a short generation through the shared
    sampler, logged as a table and written next to the checkpoint, and every
    `checkpoint.eval_every_saves` saves an lm-eval run. A failure is logged and never stops
    training."""
    every = cfg.checkpoint.eval_every_saves
    in_process = resolve_eval_mode(cfg.checkpoint, info.device) == "in_process"
    if in_process and (step // cfg.checkpoint.save_every) % every == 0:
        try:
            evaluate_in_process(path, step, model, tokenizer, cfg, info, tracker)
        except Exception as e:  # noqa: BLE001 - evaluation must never kill training
            if info.is_main:
                print(f"[checkpoint {step}] evaluation failed: {type(e).__name__}: {e}", flush=True)
    write_smoke_generation(path, step, model, tokenizer, ids, cfg, info, prompts, tracker)


def write_smoke_generation(path, step, model, tokenizer, ids, cfg, info, prompts, tracker) -> None:
    """Decode the smoke prompts, log them as a table and write `smoke_generation.json` into the
    checkpoint `path` (also called on resume when a kill right after the save left it out). A
    failure is logged and never stops training. A collective under ZeRO-3: every rank enters."""
    try:
        result = smoke_generate(model, tokenizer, ids, cfg, info, prompts)
    except Exception as e:  # noqa: BLE001 - evaluation must never kill training
        if info.is_main:
            print(
                f"[checkpoint {step}] smoke generation failed: {type(e).__name__}: {e}", flush=True
            )
        return
    if result is None or not info.is_main:
        return
    texts, stats = result
    rows = [
        [tokenizer.decode(p, skip_special_tokens=False), t]
        for p, t in zip(prompts, texts, strict=False)
    ]
    tracker.log_table("samples", ["prompt", "completion"], rows, step)
    with open(os.path.join(path, SMOKE_FILE), "w") as f:
        json.dump(
            {"step": step, "samples": rows, "tpf": stats.tpf, "tokens_per_s": stats.tokens_per_s},
            f,
            indent=2,
        )
