"""The only module that touches torch.distributed and DeepSpeed.

Contract:
- `init_distributed()` works the same under `python -m` (a world of one: it fills in the
  rendezvous variables torchrun would set) and under `torchrun`/`deepspeed`; NCCL on CUDA, gloo
  on CPU (`DS_ACCELERATOR=cpu`).
- `deepspeed_config(...)` is the one place the DeepSpeed json is produced from our typed config.
- `create_engine(...)`: a real DeepSpeed engine (ZeRO 0-3, optional CPU offload) over the model,
  AdamW with decoupled weight decay on matrices only, and a step-indexed LR schedule.
- `inference_model(model)`: whole weights on every rank for a block of decoding (the model
  itself below ZeRO-3, else a hook-free twin over the gathered tensors), so that ranks may take
  different numbers of sampler forwards; never per forward. Loads and exports gather one decoder
  layer at a time (`layerwise_gather`), so no rank holds the whole model for them.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise the process group once (idempotent) and return this process's place in it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python -m`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a world of one); returns t."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(
    sums: dict[str, float | torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Sum named values over ranks in one collective; returns float64 tensors by name, each of
    its value's shape. Every rank passes the same names (laid out in sorted order, so the
    insertion order of the dict does not matter); a value is a number or a tensor of any shape.
    A float32 value comes back exactly as a float32 all-reduce over two ranks would give it."""
    names = sorted(sums)
    values = [torch.as_tensor(sums[k], device=device).detach() for k in names]
    flat = torch.cat([v.to(torch.float64).reshape(-1) for v in values])  # (sum of sizes,)
    all_reduce_sum(flat)
    out, start = {}, 0
    for name, v in zip(names, values, strict=True):
        out[name] = flat[start : start + v.numel()].view(v.shape)
        start += v.numel()
    return out


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer of rank `src` to the other ranks (ZeRO-3 gathers parameters only, so
    buffers such as the router's expert bias, loaded on one rank, travel this way)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b.data, src=src)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def check_deepspeed(ds_cfg) -> None:
    """ValueError naming the `deepspeed.*` key to change (called at launch and here)."""
    if ds_cfg.stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage={ds_cfg.stage}: ZeRO stages are 0, 1, 2, 3")
    if ds_cfg.offload_param and ds_cfg.stage != 3:
        raise ValueError("deepspeed.offload_param needs deepspeed.stage=3")
    if ds_cfg.offload_optimizer and ds_cfg.stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")


def deepspeed_config(
    ds_cfg,  # config.DeepSpeedConfig
    optim_cfg,  # config.OptimConfig
    micro_batch_size: int,
    accumulation_steps: int,
    world_size: int,
    precision: str,
) -> dict[str, Any]:
    """The DeepSpeed json for our run; `ds_cfg.overrides` is merged last (nested dicts merged)."""
    check_deepspeed(ds_cfg)
    zero: dict[str, Any] = {"stage": ds_cfg.stage}
    if ds_cfg.stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds_cfg.stage == 3:
        # gather every parameter the same way on every rank; MoE experts are stacked weights
        # used whole, so the trace is identical across ranks (SPEC section 1)
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "gradient_clipping": optim_cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam, built from config
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim_cfg.lr,
                "betas": list(optim_cfg.betas),
                "eps": optim_cfg.eps,
                "weight_decay": optim_cfg.weight_decay,
            },
        }
    return _merge(config, dict(ds_cfg.overrides))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = (
            _merge(dict(base[k]), dict(v))
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2); none on norms (vectors). A parameter created
    partitioned by ZeRO-3 (`zero.Init`) is judged by its full shape (`ds_shape`), not by its
    empty local placeholder."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # LoRA trains matrices only: no empty group


def lr_lambda(
    step: int, max_steps: int, warmup_ratio: float, min_lr_ratio: float, decay_ratio: float = 1.0
) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warmup over
    ceil(warmup_ratio * max_steps) steps, constant at 1, then a cosine to min_lr_ratio over the
    last ceil(decay_ratio * max_steps) steps (at most every step after the warmup).

    decay_ratio = 1: warmup + cosine over the whole run (the usual LLM schedule).
    decay_ratio < 1: warmup-stable-decay (WSD; Hu et al. 2024, MiniCPM section 4): the rate
    stays at its peak until the final decay. Issue 17 found the tiny recipe's addition task
    learnt only late, after a whole-run cosine has already lowered the rate (docs/learning.md).
    """
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay = min(max_steps - warmup, math.ceil(decay_ratio * max_steps))
    decay_start = max_steps - decay
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, decay))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def create_engine(model: torch.nn.Module, ds_config: dict[str, Any], optim_cfg, max_steps: int):
    """A DeepSpeed engine with AdamW and the `lr_lambda` schedule (stepped by DeepSpeed)."""
    import deepspeed

    schedule = lambda s: lr_lambda(  # noqa: E731
        s, max_steps, optim_cfg.warmup_ratio, optim_cfg.min_lr_ratio, optim_cfg.decay_ratio
    )
    optimizer = None
    if "optimizer" not in ds_config:
        # ZeRO-0 steps this optimizer bare: the guarded one skips non-finite steps (see there)
        adamw = GuardedAdamW if ds_config["zero_optimization"]["stage"] == 0 else torch.optim.AdamW
        optimizer = adamw(
            param_groups(model, optim_cfg.weight_decay),
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None
        if optimizer is not None
        else param_groups(model, optim_cfg.weight_decay),
        lr_scheduler=scheduler,
        config=ds_config,
    )
    return engine


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, agreed over all ranks.

    ZeRO-1/2/3 already skip such a step (their optimizer sets `overflow` when the global
    gradient norm is inf/NaN; the engine then counts a skipped step, steps no LR schedule and
    `was_step_applied()` is False). ZeRO-0 steps the bare optimizer, which has no such check:
    this one computes the local squared gradient norm (fp32, as DeepSpeed's clipping), agrees
    on its finiteness over ranks and, when it is not finite, leaves parameters and optimizer
    state untouched and sets `overflow`, which the engine reads the same way."""

    overflow = False

    def step(self, closure=None):  # noqa: D102 - see the class docstring
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        local = torch.zeros(1, dtype=torch.float32, device=device)
        for grad in grads:
            local += grad.detach().float().pow(2).sum()
        bad = torch.tensor([0.0 if torch.isfinite(local).all() else 1.0], device=device)
        self.overflow = bool(all_reduce_sum(bad) > 0)
        return None if self.overflow else super().step(closure)


def reset_schedule(engine, lr: float) -> None:
    """After a resume: the LR of the next update recomputed under the current config (base lr
    `lr` and the schedule the engine was built with, at the restored schedule position), not
    the value the old schedule left in the restored optimizer state."""
    scheduler = engine.lr_scheduler
    position = scheduler.last_epoch  # scheduler steps taken (skipped optimizer steps excluded)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(position)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def weights_finite(model: torch.nn.Module, device) -> bool:
    """Whether every parameter and buffer of `model` is finite, agreed over all ranks (under
    ZeRO-3 each rank checks its own partitions)."""
    bad = torch.zeros(1, device=device)
    for t in [*model.parameters(), *model.buffers()]:
        local = getattr(t, "ds_tensor", t)  # the ZeRO-3 partition, else the tensor
        if local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
            bad += 1
            break
    return float(all_reduce_sum(bad)) == 0


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions the parameters of `model`."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def layerwise_gather(model: torch.nn.Module, modifier_rank: int | None = None):
    """The `gather` argument of `model.io`'s load/export: None when `model` is not partitioned
    (below ZeRO-3), else a function making a list of its parameters whole for a block."""
    if not is_partitioned(model):
        return None
    return lambda params: gathered_parameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def inference_model(model: torch.nn.Module):
    """The model with whole weights for decoding, on this rank alone: `model` itself below
    ZeRO-3; under ZeRO-3 a twin without DeepSpeed's hooks that shares the gathered tensors.

    Entering and leaving are collective (every rank must), but what happens inside is not: the
    sampler takes a data-dependent number of forwards per rank, and ZeRO-3's per-module hooks
    would re-gather released weights collectively inside them and deadlock.
    """
    if not is_partitioned(model):
        yield model
        return
    with gathered_parameters(model):
        with torch.device("meta"):
            twin = type(model)(model.config)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                owner_name, _, leaf = name.rpartition(".")
                owner = twin.get_submodule(owner_name)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(t.data, requires_grad=False)
                else:
                    owner._buffers[leaf] = t.data
        twin.train(model.training)
        yield twin


@contextlib.contextmanager
def gathered_parameters(
    model: torch.nn.Module | list[torch.nn.Parameter], modifier_rank: int | None = None
):
    """Full parameters inside the block under ZeRO-3 (once, around a whole sampler call), of a
    module or of a list of parameters; with `modifier_rank`, that rank's in-place changes are
    scattered back on exit."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield
