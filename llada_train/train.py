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
from omegaconf import DictConfig
from tqdm import tqdm

from llada_train.checkpoint import fault_point
from llada_train.config import DataKind, check_run
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
    load_heldout_questions,
    load_sft_examples,
)
from llada_train.distributed import (
    all_reduce_sums,
    deepspeed_config,
    resolve_precision,
    world_size_from_env,
)
from llada_train.errors import check_known_keys
from llada_train.lora import lora_parameter_count, trainable_parameters
from llada_train.losses import (
    diffusion_loss,
    expert_bias_update,
    load_balance_aux_loss,
    loss_metrics,
    micro_batch_loss,
    padding_positions,
)
from llada_train.masks import training_inputs
from llada_train.memory_plan import print_plan
from llada_train.model.attention import resolve_backend
from llada_train.model.build import resolve_model_config
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.run import open_run, run_tokenizer
from llada_train.tokenizer import SpecialIds


@dataclass
class StepInputs:
    x0: torch.Tensor  # (B, L)
    doc_ids: torch.Tensor | None  # (B, L)
    c: Corruption


# ---------------------------------------------------------------------------- set-up helpers
def check_config(cfg: DictConfig, task: str) -> None:
    """ValueError saying what to change, before any work (string options are enums of the
    schema, checked at composition)."""
    if task not in tuple(DataKind):
        raise ValueError(f"task must be one of {[k.value for k in DataKind]}")
    if cfg.data.kind != task:
        raise ValueError(f"data.kind={cfg.data.kind} but this is the {task} entry point")
    if cfg.init_required and not cfg.init_from and not cfg.dry_run:
        raise ValueError(
            "this recipe fine-tunes a released model: pass init_from=/path/to/checkpoint_dir "
            "(an HF-format LLaDA2.x directory with config.json, safetensors and tokenizer)"
        )
    if cfg.corruption.pad_weight < 0:
        raise ValueError(f"corruption.pad_weight={cfg.corruption.pad_weight} must be >= 0")
    if cfg.max_steps <= 0 or cfg.micro_batch_size <= 0 or cfg.block_length <= 0:
        raise ValueError("max_steps, micro_batch_size and block_length must be positive")
    if cfg.data.max_length % cfg.block_length:
        fit = max(cfg.block_length, cfg.data.max_length // cfg.block_length * cfg.block_length)
        raise ValueError(
            f"data.max_length={cfg.data.max_length} is not a multiple of block_length="
            f"{cfg.block_length}: examples are padded (SFT) or cut (CPT) to whole blocks, so they "
            f"would exceed it; set data.max_length={fit} or another multiple"
        )
    h = cfg.heldout
    if h.every < 0:
        raise ValueError(f"heldout.every={h.every} must be >= 0 (0 = no held-out check)")
    for key in ("num_questions", "gen_length"):
        if h[key] <= 0:
            raise ValueError(f"heldout.{key}={h[key]} must be positive")
    if h.every > 0 and not h.files:
        raise ValueError(
            f"heldout.every={h.every} but heldout.files is empty: name a file of held-out chats "
            "or RL prompt records, e.g. heldout.files=[data/shipped/sft_eval.jsonl], or set "
            "heldout.every=0"
        )
    for path in h.files if h.every > 0 else []:
        if not os.path.isfile(path):
            raise ValueError(
                f"heldout.files: {path} does not exist; name a file of held-out chats or RL "
                "prompt records (.jsonl, .json or .parquet) or set heldout.every=0"
            )
    check_run(cfg)


def dry_run(cfg: DictConfig, task: str) -> None:
    """Build on the meta device, print parameter counts, the DeepSpeed config and the memory
    plan (llada_train/memory_plan.py; `plan.num_gpus` / `plan.gpu_gb` override the world size
    and the GPU memory), exit."""
    tokenizer = run_tokenizer(cfg)
    config = resolve_model_config(cfg.init_from, cfg.model, tokenizer)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    counted = sum(p.numel() for p in model.parameters())
    total, active = config.num_parameters()
    assert counted == total, (counted, total)
    world = cfg.plan.num_gpus or world_size_from_env()
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
    print_plan(cfg, config, task, world)


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
    run = open_run(cfg, task, {"global_batch_size": cfg.global_batch_size})
    info, tokenizer, ids, config = run.info, run.tokenizer, run.ids, run.model_config

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
    ds_config = run.deepspeed_config(accumulation)
    prompts = smoke_prompts(tokenizer, task, chats)
    h_cfg = cfg.heldout  # check_config: files are named whenever every > 0
    heldout = (
        load_heldout_questions(
            list(h_cfg.files), tokenizer, h_cfg.num_questions, cfg.data.format, cfg.data.field
        )
        if h_cfg.every > 0
        else []
    )
    engine = run.start(run.build_model(ds_config), ds_config, cfg.max_steps, prompts)
    model = run.model
    total, active = config.num_parameters()
    lora = " by LoRA" if cfg.lora.enabled else ""
    run.announce(
        f"{len(examples)} examples ({skipped} bad records skipped), {total / 1e6:.2f}M params "
        f"({active / 1e6:.2f}M active, {trainable_parameters(model) / 1e6:.3f}M trained{lora}), "
        f"accumulation {accumulation}"
    )
    if packing and info.is_main:
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
    moe_layers = model.moe_layers()
    bar = tqdm(
        total=cfg.max_steps, initial=run.start_step, desc=task, dynamic_ncols=True,
        disable=not (info.is_main and cfg.progress),
    )  # fmt: skip
    model.train()
    for step in range(run.start_step, cfg.max_steps):
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
        global_count = all_reduce_sums(
            {"supervised": torch.stack([m.c.supervised.sum() for m in micro]).sum()}, info.device
        )["supervised"]
        loss_stats = []  # LossTerms.stats() of each micro-batch
        loads = torch.zeros(len(moe_layers), config.num_experts, device=info.device)
        num_tokens, own_norm = 0, None
        for inputs in micro:
            logits = model_forward(engine, inputs.c.xt, inputs.x0, inputs.doc_ids, cfg.block_length)
            is_pad = padding_positions(inputs.x0, ids.eos_id)  # metrics split; pad_weight
            terms = diffusion_loss(
                logits, inputs.x0, inputs.c, cfg.corruption.weighting, is_pad=is_pad,
                pad_weight=cfg.corruption.pad_weight,
            )  # fmt: skip
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
            loss_stats.append(terms.stats())
            for k, moe in enumerate(moe_layers):
                loads[k] += moe.last_expert_load.float()
            num_tokens += inputs.x0.numel()
        sums = all_reduce_sums({"loss_terms": sum(loss_stats), "expert_load": loads}, info.device)
        loads = sums["expert_load"].to(loads.dtype)
        metrics = loss_metrics(sums["loss_terms"])
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
        if is_finite and cfg.moe.bias_update_rate > 0 and moe_layers:
            update_expert_bias(model, loads, cfg.moe.bias_update_rate)  # not after a skipped step
        elapsed = time.perf_counter() - t0
        mean_load = loads.mean(-1, keepdim=True).clamp_min(1e-9)
        metrics.update(
            {
                "lr": engine.get_lr()[0],
                "lr/applied": lr_applied,
                "nonfinite/steps": run.num_nonfinite + (not is_finite),  # this one included
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
        if run.should_check_heldout(step + 1):
            metrics.update(run.heldout_check(heldout, step + 1))
        if run.should_log(step + 1) or "heldout/exact_match" in metrics:
            run.tracker.log(metrics, step=step + 1)
        bar.update(1)
        bar.set_postfix(  # accuracy on the masked answer tokens: the EOS padding would inflate it
            loss=f"{metrics['loss/total']:.3f}", acc_resp=f"{metrics['acc/m2t/response']:.2f}"
        )
        run.count_nonfinite(step + 1, is_finite, metrics["loss/total"], grad_norm)
        if run.should_save(step + 1):
            run.save(step + 1)
        if info.is_main:
            fault_point("kill_after_step", step + 1)
    bar.close()
    run.finish()
    return run.run_dir
