"""The EBPO loop: rollouts through the shared sampler, rewards, block-level ELBO ratio updates.

Reads top to bottom, one rollout batch per step:
    this rank's prompts of the step (a seeded order, P prompts per step, P / W per rank; all G
    completions of a prompt stay on one rank)
    rollouts with the shared sampler at temperature > 0 (under ZeRO-3 with `rollout.gather`:
    the whole model gathered once, or layerwise with the ranks in lock-step); a share of the
    groups decodes M2T+T2T ("dual mode"), the rest M2T only
    rewards (plain functions by name; a failing reward scores 0 and is counted)
    with rollout.max_rounds > 1 (DAPO dynamic sampling), more rounds of fresh prompts until the
    batch is full of groups with reward variance (`collect_rollouts`)
    group-relative advantages
    theta_old terms: one no-grad forward per noise level of [y_t ; y] gives every block's term
    `updates_per_batch` optimizer steps on the clipped sequence-ratio objective, with the same
    noise draws as theta_old (common random numbers), so the first ratio is exactly 1
    log; held-out reward every `eval_every` steps; atomic checkpoint + HF export
Randomness is a function of (seed, step, rank, round), so a resumed run repeats an uninterrupted
one (given deterministic rewards: a code reward that times out can change which groups are kept).
`dry_run=true` prints the sizes, the DeepSpeed config and the memory plan, and exits (`dry_run`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from llada_train.checkpoint import resolve_model_dir
from llada_train.config import check_run
from llada_train.corruption import example_seed
from llada_train.data.pipeline import epoch_order
from llada_train.distributed import (
    all_reduce_sum,
    all_reduce_sums,
    deepspeed_config,
    resolve_precision,
    world_size_from_env,
)
from llada_train.elbo import elbo_noise, elbo_terms, level_weights, sequence_log_ratio, stack_t
from llada_train.errors import check_known_keys
from llada_train.losses import micro_batch_loss
from llada_train.model.io import training_default
from llada_train.rl.advantages import group_advantages, has_signal
from llada_train.rl.objectives import OBJECTIVES, loss_count
from llada_train.rl.rewards import check_record, score_batch
from llada_train.run import open_run
from llada_train.sampler import Sampler, warn_untrained_editing
from llada_train.tokenizer import encode_prompt


# ---------------------------------------------------------------------------- data
def load_prompts(
    files: list[str],
    cfg: DictConfig,
    tokenizer,
    limit: int | None = None,
    max_positions: int | None = None,
) -> list[dict]:
    """Records with `prompt_ids` added (chat template applied); errors name file and line. A
    prompt whose tokens + rollout.gen_length exceed `max_positions` (the model's
    max_position_embeddings), or a record its reward cannot score (`rewards.check_record`: a code
    record without entry_point or tests, a math record without answer), is a BadRecord."""
    from llada_train.data.pipeline import BadRecord, read_records

    records = []
    for rec, origin in read_records(list(files)):
        prompt = rec.get(cfg.data.prompt_field) if isinstance(rec, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRecord(f"{origin}: field '{cfg.data.prompt_field}' is missing or empty")
        reward = cfg.data.reward or rec.get("reward")
        if reward is None:
            raise BadRecord(f"{origin}: no 'reward' field and data.reward is not set")
        try:  # a record its reward cannot score (e.g. code without entry_point) fails here
            check_record(reward, rec)
        except ValueError as e:
            raise BadRecord(f"{origin}: {e}") from None
        prompt_ids = encode_prompt(tokenizer, prompt, cfg.data.system, True)
        total = len(prompt_ids) + cfg.rollout.gen_length
        if max_positions is not None and total > max_positions:
            raise BadRecord(
                f"{origin}: prompt of {len(prompt_ids)} tokens + rollout.gen_length="
                f"{cfg.rollout.gen_length} exceed the model's max_position_embeddings="
                f"{max_positions}; shorten the prompt or lower rollout.gen_length"
            )
        records.append({**rec, "reward": reward, "prompt_ids": prompt_ids})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"no RL prompts in {list(files)}")
    return records


def step_prompt_indices(num: int, step: int, per_step: int, seed: int) -> list[int]:
    """Dataset indices of the global prompt batch of `step` (seeded permutation per epoch)."""
    orders: dict[int, list[int]] = {}
    out = []
    for p in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(p, num)
        if epoch not in orders:
            orders[epoch] = epoch_order(num, seed, epoch)
        out.append(orders[epoch][k])
    return out


# ---------------------------------------------------------------------------- rollouts
def rollout(
    model,
    ids,
    s_cfg,
    prompts: list[list[int]],
    group_size: int,
    dual_groups: int,
    seed: int,
    device,
):
    """G completions per prompt; the first `dual_groups` groups decode M2T+T2T, the others M2T
    only. Returns (completions in prompt-major order, per-completion dual flag, stats list)."""
    completions: list[list[int] | None] = [None] * (len(prompts) * group_size)
    dual_flags = [g < dual_groups for g in range(len(prompts)) for _ in range(group_size)]
    stats = []
    sampler = Sampler(model, ids.mask_id, ids.eos_id, s_cfg, device=device)
    for dual, offset in ((True, 0), (False, 1)):
        rows = [i for i, flag in enumerate(dual_flags) if flag == dual]
        if not rows:
            continue
        batch = [prompts[i // group_size] for i in rows]
        editing = s_cfg.editing_threshold if dual else None
        out = sampler.generate(batch, editing_threshold=editing, seed=seed * 2 + offset)
        for i, tokens in zip(rows, out.tokens, strict=True):
            completions[i] = tokens
        stats.append(out.stats)
    return completions, dual_flags, stats


def choose_groups(groups: list, signal: list[bool], size: int) -> list:
    """The `size` groups a dynamic-sampling batch trains on, in sampling order: the first
    `size` groups with signal (reward variance), and, if fewer have it, the first
    zero-variance ones to fill up. E.g. signal [F, T, F, T, T], size 2 -> groups 1, 3; signal
    [F, T, F], size 2 -> groups 0, 1; all groups when size == len(groups) (no filtering).
    Raises ValueError when fewer than `size` groups exist."""
    if len(groups) != len(signal):
        raise ValueError(f"{len(groups)} groups but {len(signal)} signal flags")
    if len(groups) < size:
        raise ValueError(f"need {size} groups, got {len(groups)}")
    with_signal = [i for i, s in enumerate(signal) if s][:size]
    without = [i for i, s in enumerate(signal) if not s][: size - len(with_signal)]
    return [groups[i] for i in sorted(with_signal + without)]


@dataclass
class RolloutBatch:
    """One rank's rollouts of one step. `examples`, `completions`, `texts`, `dual_flags` and
    `rewards` hold the kept groups (per_rank groups of G, prompt-major): what the update trains
    on. The `sampled_*` fields cover every group sampled in every round (the rollout policy's
    reward and signal, whatever was kept): per-completion lists, or counts."""

    examples: list[dict] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    dual_flags: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    rounds: int = 0
    reward_errors: int = 0
    sampled_rewards: list[float] = field(default_factory=list)
    sampled_names: list[str] = field(default_factory=list)  # each sampled reward's function
    sampled_groups: int = 0
    sampled_signal_groups: int = 0
    sampled_response_tokens: int = 0
    stats: list = field(default_factory=list)  # the sampler's DecodeStats of every call


def collect_rollouts(
    model, ids, tokenizer, s_cfg, records: list[dict], cfg: DictConfig, step: int, rank: int,
    per_rank: int, device,
) -> RolloutBatch:  # fmt: skip
    """This rank's rollout groups of `step`, with DAPO's dynamic sampling when
    rollout.max_rounds > 1 (Yu et al. 2025, "DAPO", section 3.2: keep sampling until the batch
    is full of groups whose rewards are not all equal).

    Round r draws this rank's per_rank prompts of the global batch at position step * R + r of
    the seeded prompt order (R = rollout.max_rounds; R = 1 gives exactly the plain loop's
    prompts and seeds). Every step reserves R positions whether or not its later rounds run,
    so with R > 1 an epoch of prompts passes in 1/R of the steps, and a prompt may come twice
    in one step when R * prompts_per_step exceeds the data. Each round decodes G completions
    of each prompt (`rollout`: the first round(rollout.dual_mode_fraction * per_rank) groups
    of every round in dual mode) and scores them. Groups with reward variance are kept in
    sampling order; the rounds stop once per_rank of them are kept or R rounds ran. When they
    run out first, zero-variance groups (advantage 0, so no gradient from the clipped
    objective; the k3 KL term still has one when conf.kl_coef > 0) fill the batch in sampling
    order: every rank always updates on per_rank groups, a fixed number of micro-batches.
    Sampling order puts a round's dual-mode groups first, so a cut-short last round and the
    fillers favour them (`update/dual_groups` logs the kept share). With EBPO (a mean over
    sequences) a kept group's gradient is the one it has unfiltered; with GRPO's token mean
    the denominator is the kept batch's response tokens.

    Randomness is a function of (seed, step, rank, round), so a resumed run repeats. Ranks stop
    independently (no collective inside). Raises nothing of its own; reward failures score 0
    and are counted in `reward_errors`.
    """
    group = cfg.rollout.group_size
    rounds = cfg.rollout.max_rounds
    dual_groups = round(cfg.rollout.dual_mode_fraction * per_rank)
    out = RolloutBatch()
    groups: list[tuple] = []  # every sampled group, in sampling order
    signals: list[bool] = []
    for r in range(rounds):
        indices = step_prompt_indices(
            len(records), step * rounds + r, cfg.rollout.prompts_per_step, cfg.seed
        )
        mine = [records[i] for i in indices[rank * per_rank : (rank + 1) * per_rank]]
        completions, dual_flags, stats = rollout(
            model, ids, s_cfg, [m["prompt_ids"] for m in mine], group, dual_groups,
            example_seed(cfg.seed, step, rank, r), device,
        )  # fmt: skip
        examples = [mine[i // group] for i in range(len(completions))]
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        rewards, errors = score_batch(
            [e["reward"] for e in examples], texts, examples, max_workers=cfg.rollout.reward_workers
        )
        signal = has_signal(torch.tensor(rewards, dtype=torch.float32), group)  # (per_rank,)
        out.rounds += 1
        out.reward_errors += errors
        out.stats.extend(stats)
        out.sampled_rewards.extend(rewards)
        out.sampled_names.extend(e["reward"] for e in examples)
        out.sampled_groups += len(mine)
        out.sampled_signal_groups += int(signal.sum())
        out.sampled_response_tokens += sum(len(c) for c in completions)
        for g in range(len(mine)):
            rows = slice(g * group, (g + 1) * group)
            item = (examples[rows], completions[rows], texts[rows], dual_flags[rows], rewards[rows])
            groups.append(item)
            signals.append(bool(signal[g]))
        if sum(signals) >= per_rank:
            break
    for examples, completions, texts, dual_flags, rewards in choose_groups(
        groups, signals, per_rank
    ):
        out.examples += examples
        out.completions += completions
        out.texts += texts
        out.dual_flags += dual_flags
        out.rewards += rewards
    return out


def build_sequences(prompts, completions, eos_id: int, block_length: int, device):
    """x0 = [prompt ; completion ; EOS padding] (B, L), L a multiple of block_length, and the
    response mask (B, L): completion tokens (EOS included), never the prompt or the padding."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    seq_len = -(-max(lengths) // block_length) * block_length
    x0 = torch.full((len(prompts), seq_len), eos_id, dtype=torch.long)  # (B, L)
    response_mask = torch.zeros((len(prompts), seq_len), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        x0[i, : len(p)] = torch.tensor(p)
        if c:
            x0[i, len(p) : len(p) + len(c)] = torch.tensor(c)
            response_mask[i, len(p) : len(p) + len(c)] = True
    return x0.to(device), response_mask.to(device)


def held_out_sums(
    model, ids, tokenizer, s_cfg, records, info, gen_length: int, workers: int
) -> torch.Tensor:
    """(sum of rewards, number of prompts) (2,) float64 of greedy (temperature 0) decoding of
    this rank's share of the held-out prompts (every world_size-th from its rank). No
    collective: the caller all-reduces after its decoding block (a layerwise block admits no
    other collective); the held-out reward is sum / count over all ranks."""
    mine = records[info.rank :: info.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    if mine:
        cfg = s_cfg.replace(temperature=0.0, gen_length=gen_length)
        out = Sampler(model, ids.mask_id, ids.eos_id, cfg, device=info.device).generate(
            [r["prompt_ids"] for r in mine]
        )
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
        values, _ = score_batch([r["reward"] for r in mine], texts, mine, max_workers=workers)
        total += torch.tensor([sum(values), len(values)], dtype=torch.float64, device=info.device)
    return total


# ---------------------------------------------------------------------------- the loop
def check_rl_config(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(prompts per rank, accumulation steps), or a ValueError saying what to change."""
    r = cfg.rollout
    if r.prompts_per_step % world_size:
        raise ValueError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be a multiple of the "
            f"{world_size} processes"
        )
    per_rank = r.prompts_per_step // world_size
    sequences = per_rank * r.group_size
    if sequences % cfg.micro_batch_size:
        raise ValueError(
            f"{sequences} sequences per rank (prompts {per_rank} x group {r.group_size}) must be a "
            f"multiple of micro_batch_size={cfg.micro_batch_size}"
        )
    if r.max_rounds < 1:
        raise ValueError(
            f"rollout.max_rounds={r.max_rounds} must be >= 1 (1 = no dynamic sampling)"
        )
    if r.max_rounds > 1 and r.group_size < 2:
        raise ValueError(
            f"rollout.max_rounds={r.max_rounds} needs rollout.group_size >= 2: a group of one "
            "never has reward variance, so every round would be spent for nothing"
        )
    if r.temperature <= 0:
        raise ValueError(
            "rollout.temperature must be > 0: a group of identical greedy answers has no signal"
        )
    if cfg.conf.kl_coef > 0 and cfg.deepspeed.stage == 3:
        raise ValueError(
            "conf.kl_coef > 0 keeps a full reference copy; not supported with ZeRO-3 yet"
        )
    check_run(cfg)
    return per_rank, sequences // cfg.micro_batch_size


def dry_run(cfg: DictConfig) -> None:
    """`dry_run=true`: build the model on the meta device (no weights), print its sizes, the
    DeepSpeed config and the memory plan (`memory_plan.print_plan`, with `rollout.gather`
    resolved) for `plan.num_gpus` or WORLD_SIZE processes, and return. The model comes from
    `plan.model` (conf/model/NAME.yaml; the flash RL recipe sets it) or init_from's
    config.json; no tokenizer or data is read. Raises ValueError as `check_rl_config` does, or
    when no model is named (`memory_plan.rl_model_config`)."""
    from omegaconf import OmegaConf

    from llada_train.memory_plan import print_plan, rl_model_config
    from llada_train.model.modeling import LLaDA2MoeModelLM

    config = rl_model_config(cfg)
    init_from = OmegaConf.select(cfg, "init_from", throw_on_missing=False)
    model_dir = resolve_model_dir(init_from) if init_from and not cfg.plan.model else None
    cfg.block_length = training_default("block_length", cfg.block_length, model_dir, 32)
    world = cfg.plan.num_gpus or world_size_from_env()
    _, accumulation = check_rl_config(cfg, world)
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(config)
    total, active = config.num_parameters()
    assert sum(p.numel() for p in model.parameters()) == total
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = deepspeed_config(
        cfg.deepspeed, cfg.optim, cfg.micro_batch_size, accumulation, world,
        resolve_precision(cfg.precision, device),
    )  # fmt: skip
    print("[dry run] rl: model built on the meta device (no weights allocated)")
    print(f"total parameters:  {total:,} ({total / 1e9:.2f}B)")
    print(f"active per token:  {active:,} ({active / 1e9:.2f}B)")
    print(f"layers {config.num_hidden_layers}, experts {config.num_experts} "
          f"top-{config.num_experts_per_tok}")  # fmt: skip
    print("resolved DeepSpeed config:")
    print(json.dumps(ds, indent=2))
    print_plan(cfg, config, "rl", world)


def rl_train(cfg: DictConfig) -> str:
    """Run EBPO/GRPO as configured; returns the output directory. Bad input (config keys and
    values, prompt files, init_from files, an unwritable output_dir) fails with a ValueError
    before the model is built. `dry_run=true` prints the plan instead (`dry_run`)."""
    check_known_keys(cfg)
    if cfg.dry_run:
        dry_run(cfg)
        return cfg.output_dir
    if not cfg.init_from:  # a recipe of a released model leaves it to the command line
        raise ValueError(
            "init_from is not set: pass init_from=/path/to/model (an SFT run, a checkpoint or an "
            "HF-format LLaDA2.x directory with config.json, safetensors and tokenizer)"
        )
    cfg.init_from = resolve_model_dir(cfg.init_from)
    cfg.block_length = training_default("block_length", cfg.block_length, cfg.init_from, 32)
    per_rank, accumulation = check_rl_config(cfg, world_size_from_env())
    run = open_run(
        cfg,
        "rl",
        {  # rollout_rounds moves the prompt stream (collect_rollouts): a resume must keep it
            "global_batch": [cfg.rollout.prompts_per_step, cfg.rollout.group_size],
            "rollout_rounds": cfg.rollout.max_rounds,
        },
    )
    info, tokenizer, ids = run.info, run.tokenizer, run.ids
    max_positions = run.model_config.max_position_embeddings
    train_records = load_prompts(cfg.data.train_files, cfg, tokenizer, None, max_positions)
    eval_records = (
        load_prompts(cfg.data.eval_files, cfg, tokenizer, cfg.data.num_eval_prompts, max_positions)
        if cfg.data.eval_files
        else []
    )
    ds_config = run.deepspeed_config(accumulation)
    model = run.build_model(ds_config)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.conf.kl_coef > 0 else None
    updates = cfg.conf.updates_per_batch
    smoke = [r["prompt_ids"] for r in (eval_records or train_records)[:8]]
    engine = run.start(model, ds_config, cfg.max_steps * updates, smoke)
    model = run.model
    if reference is not None:
        reference.to(info.device)
    base_sampler = check_run(cfg).replace(
        gen_length=cfg.rollout.gen_length, temperature=cfg.rollout.temperature,
        top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
    )  # fmt: skip
    # dual-mode rollouts and the held-out reward decode with the sampler's T2T editing
    if info.is_main:
        warn_untrained_editing(cfg.init_from, base_sampler.editing_threshold is not None)
    objective = OBJECTIVES[cfg.conf.name]
    run.announce(
        f"{cfg.conf.name}, {len(train_records)} prompts, {len(eval_records)} held out, "
        f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size} per step"
    )

    def evaluate(step: int) -> None:
        if not eval_records:
            return
        with run.decoding() as whole:
            total = held_out_sums(
                whole, ids, tokenizer, base_sampler, eval_records, info, cfg.rollout.gen_length,
                cfg.rollout.reward_workers,
            )  # fmt: skip
        all_reduce_sum(total)
        value = float(total[0] / total[1].clamp_min(1))
        run.tracker.log({"eval/reward": value}, step=step)
        if info.is_main:
            print(f"[step {step}] held-out reward {value:.4f}", flush=True)

    model.train()
    if run.start_step == 0:
        evaluate(0)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc="rl", dynamic_ncols=True,
               disable=not (info.is_main and cfg.progress))  # fmt: skip
    for step in range(run.start_step, cfg.max_steps):
        t0 = time.perf_counter()
        # ---- rollouts (this rank's prompts, all G completions of each; DAPO dynamic sampling)
        group = cfg.rollout.group_size
        with run.decoding() as whole:
            batch = collect_rollouts(
                whole, ids, tokenizer, base_sampler, train_records, cfg, step, info.rank,
                per_rank, info.device,
            )  # fmt: skip
        t_rollout = time.perf_counter() - t0
        examples, completions, texts = batch.examples, batch.completions, batch.texts
        rewards, dual_flags = batch.rewards, batch.dual_flags
        rewards_t = torch.tensor(rewards, dtype=torch.float32).view(per_rank, group)
        advantages = (
            group_advantages(rewards_t, scale_std=cfg.conf.scale_std).reshape(-1).to(info.device)
        )

        # ---- theta_old terms, with the noise every update will reuse (common random numbers)
        t1 = time.perf_counter()
        x0, response_mask = build_sequences(
            [e["prompt_ids"] for e in examples],
            completions,
            ids.eos_id,
            cfg.block_length,
            info.device,
        )
        seeds = [
            example_seed(cfg.seed, step, info.rank * 100_003 + 1, i) for i in range(len(examples))
        ]
        micro, elbo_sum = [], 0.0
        for lo in range(0, len(examples), cfg.micro_batch_size):
            sl = slice(lo, lo + cfg.micro_batch_size)
            levels = elbo_noise(
                x0[sl], response_mask[sl], cfg.conf.num_levels, seeds[sl], ids.mask_id,
                stratified=cfg.conf.stratified,
            )  # fmt: skip
            with torch.no_grad():
                old = elbo_terms(model, x0[sl], levels, cfg.block_length)
                ref = (
                    elbo_terms(reference, x0[sl], levels, cfg.block_length)
                    if reference is not None
                    else None
                )
            weights = level_weights(
                stack_t(levels), response_mask[sl].sum(1), cfg.conf.level_weights
            )
            micro.append((sl, levels, old, ref, weights))
            # the rollouts' ELBO under theta_old, sum_n w_n sum_b log p: a sum of same-signed
            # terms, so unlike the loss (a cancellation of +-A) float rounding moves it by ~1e-7
            elbo_sum += float((weights.to(old.dtype) * old.sum(-1)).sum())
        t_elbo = time.perf_counter() - t1

        # ---- updates
        t2 = time.perf_counter()
        response_len = response_mask.sum(1)  # (B,)
        global_count = all_reduce_sums(
            {"count": float(loss_count(objective, response_len))}, info.device
        )["count"]  # sequences (ebpo) or response tokens (grpo): the objective's own count
        update = dict.fromkeys(("loss_sum", "ratio_sum", "clipped", "kl_sum", "count"), 0.0)
        lr_applied = engine.get_lr()[0]  # the lr of this step's first update
        for _ in range(updates):
            update_loss = torch.zeros(1, dtype=torch.float64, device=info.device)
            for sl, levels, old, ref, weights in micro:
                new = elbo_terms(engine, x0[sl], levels, cfg.block_length)
                log_ratio = sequence_log_ratio(new, old, weights)
                kl_terms = sequence_log_ratio(ref, new, weights) if ref is not None else None
                loss_sum, count, stats = objective(
                    log_ratio, advantages[sl], cfg.conf.eps_low, cfg.conf.eps_high,
                    kl_terms=kl_terms, kl_coef=cfg.conf.kl_coef, response_len=response_len[sl],
                )  # fmt: skip
                engine.backward(
                    micro_batch_loss(loss_sum, global_count, info.world_size, accumulation)
                )
                engine.step()
                update_loss += float(loss_sum.detach())
                n = float(count)
                update["loss_sum"] += float(loss_sum.detach())
                update["ratio_sum"] += stats["ratio_mean"] * n
                update["clipped"] += stats["clip_fraction"] * n
                update["kl_sum"] += stats.get("kl", 0.0) * n
                update["count"] += n
            # Non-finite guard, one verdict for all ranks: the engine skipped the update (ZeRO's
            # overflow check, our ZeRO-0 guard: no parameter changed) or a loss is not finite.
            bad = torch.tensor([0.0 if engine.was_step_applied() else 1.0], device=info.device)
            bad += 0.0 if torch.isfinite(update_loss).all() else 1.0
            is_finite = float(all_reduce_sum(bad)) == 0
            run.count_nonfinite(step + 1, is_finite, float(update_loss), float("nan"))
        t_update = time.perf_counter() - t2

        # ---- logging (sums over ranks, by name)
        total = all_reduce_sums(
            {
                **update,
                "reward_sum": sum(batch.sampled_rewards),
                "reward_sq_sum": sum(r * r for r in batch.sampled_rewards),
                "num_rewards": len(batch.sampled_rewards),
                "reward_errors": batch.reward_errors,
                "response_tokens": batch.sampled_response_tokens,
                "zero_variance_groups": batch.sampled_groups - batch.sampled_signal_groups,
                "groups": batch.sampled_groups,
                "rounds": batch.rounds,
                "kept_signal_groups": float(has_signal(rewards_t).sum()),
                "kept_groups": per_rank,
                "kept_dual_groups": sum(dual_flags[::group]),
                "kept_rewards": len(rewards),
                "rollout_tokens": sum(s.num_tokens for s in batch.stats),
                "rollout_forwards": sum(s.num_forwards for s in batch.stats),
                "advantage_abs_sum": float(advantages.abs().sum()),
                "elbo_sum": elbo_sum,
            },
            info.device,
        )
        n = float(total["num_rewards"])
        count = total["count"]
        mean_r = float(total["reward_sum"]) / n
        metrics = {
            "reward/mean": mean_r,
            "reward/std": max(0.0, float(total["reward_sq_sum"]) / n - mean_r**2) ** 0.5,
            "reward/errors": float(total["reward_errors"]),
            "advantage/abs_mean": float(total["advantage_abs_sum"] / total["kept_rewards"]),
            "elbo/mean": float(total["elbo_sum"] / total["kept_rewards"]),
            "zero_variance_groups": float(total["zero_variance_groups"] / total["groups"]),
            "rollout/rounds": float(total["rounds"]) / info.world_size,
            "update/signal_groups": float(total["kept_signal_groups"] / total["kept_groups"]),
            "update/dual_groups": float(total["kept_dual_groups"] / total["kept_groups"]),
            "response_length/mean": float(total["response_tokens"]) / n,
            "rollout/tpf": float(total["rollout_tokens"] / total["rollout_forwards"].clamp_min(1)),
            "rollout/time_s": t_rollout,
            "time/elbo_old_s": t_elbo,
            "time/update_s": t_update,
            "loss": float(total["loss_sum"] / count),
            "ratio/mean": float(total["ratio_sum"] / count),
            "clip_fraction": float(total["clipped"] / count),
            "kl": float(total["kl_sum"] / count),
            "lr": engine.get_lr()[0],
            "lr/applied": lr_applied,
            "nonfinite/updates": run.num_nonfinite,
        }
        sampled = list(zip(batch.sampled_names, batch.sampled_rewards, strict=True))
        for name in sorted(set(batch.sampled_names)):  # this rank's sampled rollouts
            vals = [r for f, r in sampled if f == name]
            metrics[f"reward/{name}"] = sum(vals) / len(vals)
        if run.should_log(step + 1):
            run.tracker.log(metrics, step=step + 1)
            if info.is_main:
                rows = [
                    [e["prompt"], t, r, d]
                    for e, t, r, d in list(zip(examples, texts, rewards, dual_flags, strict=True))[
                        ::group
                    ][:4]
                ]
                run.tracker.log_table(
                    "rollouts", ["prompt", "completion", "reward", "dual_mode"], rows, step + 1
                )
        bar.update(1)
        bar.set_postfix(reward=f"{mean_r:.3f}", clip=f"{metrics['clip_fraction']:.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            evaluate(step + 1)
        if run.should_save(step + 1):
            path = run.save(step + 1)
            if info.is_main:
                with open(os.path.join(path, "rl_metrics.json"), "w") as f:
                    json.dump({"step": step + 1, **metrics}, f, indent=2)
    bar.close()
    run.finish()
    return run.run_dir
